#include "policy/filters.hpp"

#include <spdlog/fmt/fmt.h>

#include <algorithm>

namespace p11mux {
namespace {

constexpr std::string_view kBlanks = " \t";

std::string_view trimmed(std::string_view s) noexcept {
  const auto start = s.find_first_not_of(kBlanks);
  if (start == std::string_view::npos) return {};
  const auto end = s.find_last_not_of(kBlanks);
  return s.substr(start, end - start + 1);
}

// The entries of a comma-separated list, each trimmed; empty ones skipped
// ("a, b," is a and b).
template <class Fn>
void for_each_entry(std::string_view text, Fn&& fn) {
  while (!text.empty()) {
    const auto comma = std::min(text.find(','), text.size());
    if (std::string_view entry = trimmed(text.substr(0, comma)); !entry.empty()) fn(entry);
    text.remove_prefix(std::min(comma + 1, text.size()));
  }
}

std::string where(std::string_view key) {
  std::string env = "P11MUX_POLICY_";
  for (char c : key) env += static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  return fmt::format("[policy] {} (or {})", key, env);
}

int hex_digit(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::optional<std::string> parse_hex_bytes(std::string_view hex) {
  if (hex.empty() || hex.size() % 2 != 0) return std::nullopt;
  std::string out;
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    const int hi = hex_digit(hex[i]), lo = hex_digit(hex[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
  }
  return out;
}

std::string_view as_text(const CK_UTF8CHAR* field, std::size_t size) noexcept {
  return {reinterpret_cast<const char*>(field), size};
}

// A template's value of `type`: the last one given (as a token reads it),
// none when absent or unreadable.
std::optional<std::string_view> template_value(const CK_ATTRIBUTE* tmpl, CK_ULONG count,
                                               CK_ATTRIBUTE_TYPE type) noexcept {
  std::optional<std::string_view> value;
  for (CK_ULONG i = 0; tmpl != nullptr && i < count; ++i) {
    if (tmpl[i].type != type) continue;
    if (tmpl[i].pValue == nullptr && tmpl[i].ulValueLen != 0) return std::nullopt;
    value = std::string_view(static_cast<const char*>(tmpl[i].pValue),
                             tmpl[i].pValue == nullptr ? 0 : tmpl[i].ulValueLen);
  }
  return value;
}

std::string hex(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes) out += fmt::format("{:02x}", c);
  return out;
}

}  // namespace

std::string_view unpadded(std::string_view field) noexcept {
  const auto end = field.find_last_not_of(std::string_view(" \0", 2));
  return end == std::string_view::npos ? std::string_view{} : field.substr(0, end + 1);
}

TokenFilter::TokenFilter(std::string_view text) {
  constexpr std::size_t kLabelSize = sizeof(CK_TOKEN_INFO{}.label);
  constexpr std::size_t kSerialSize = sizeof(CK_TOKEN_INFO{}.serialNumber);
  for_each_entry(text, [&](std::string_view entry) {
    Entry e{Field::either, {}};
    std::string_view value = entry;
    if (entry.starts_with("label:")) {
      e.field = Field::label;
      value = trimmed(entry.substr(6));
    } else if (entry.starts_with("serial:")) {
      e.field = Field::serial;
      value = trimmed(entry.substr(7));
    }
    if (value.empty()) {
      throw ConfigError(fmt::format("{}: '{}' names no token", where("tokens"), entry));
    }
    const std::size_t most = e.field == Field::serial ? kSerialSize : kLabelSize;
    if (e.field != Field::either && value.size() > most) {
      throw ConfigError(fmt::format(
          "{}: '{}' is longer than a token's {} ({} bytes): it can "
          "never match",
          where("tokens"), entry, e.field == Field::label ? "label" : "serial number", most));
    }
    if (e.field == Field::either && value.size() > kLabelSize) {
      throw ConfigError(fmt::format(
          "{}: '{}' is longer than a token's label (32 bytes) and serial number: it can never "
          "match",
          where("tokens"), entry));
    }
    e.value = std::string(value);
    entries_.push_back(std::move(e));
  });
}

bool TokenFilter::exposes(const CK_TOKEN_INFO& token) const noexcept {
  const std::string_view label = unpadded(as_text(token.label, sizeof token.label));
  const std::string_view serial = unpadded(as_text(token.serialNumber, sizeof token.serialNumber));
  return std::any_of(entries_.begin(), entries_.end(), [&](const Entry& e) {
    return (e.field != Field::serial && e.value == label) ||
           (e.field != Field::label && e.value == serial);
  });
}

std::string TokenFilter::describe() const {
  std::string out;
  for (const Entry& e : entries_) {
    out += out.empty() ? "" : ",";
    out += e.field == Field::label ? "label:" : e.field == Field::serial ? "serial:" : "";
    out += e.value;
  }
  return out;
}

ObjectFilter::ObjectFilter(std::string_view text) {
  for_each_entry(text, [&](std::string_view entry) {
    if (entry.starts_with("label:")) {
      std::string_view value = trimmed(entry.substr(6));
      const bool prefix = value.ends_with('*');
      if (prefix) value.remove_suffix(1);
      if (value.empty() && !prefix) {
        throw ConfigError(fmt::format("{}: '{}' names no label (label:* for every labelled object)",
                                      where("objects"), entry));
      }
      labels_.push_back({std::string(value), prefix});
    } else if (entry.starts_with("id:")) {
      std::optional<std::string> bytes = parse_hex_bytes(trimmed(entry.substr(3)));
      if (!bytes) {
        throw ConfigError(
            fmt::format("{}: '{}' is not an ID in hex (two hex digits per byte, e.g. id:0a1b)",
                        where("objects"), entry));
      }
      ids_.push_back(std::move(*bytes));
    } else {
      throw ConfigError(
          fmt::format("{}: '{}' is neither label:NAME nor id:HEX (e.g. label:tls-key, id:0a1b)",
                      where("objects"), entry));
    }
  });
}

bool ObjectFilter::exposes(std::optional<std::string_view> label,
                           std::optional<std::string_view> id) const noexcept {
  if (label) {
    for (const Label& l : labels_) {
      if (l.prefix ? label->starts_with(l.value) : *label == l.value) return true;
    }
  }
  if (id) {
    for (const std::string& i : ids_) {
      if (*id == i) return true;
    }
  }
  return false;
}

CK_RV ObjectFilter::check_template(const CK_ATTRIBUTE* tmpl, CK_ULONG count,
                                   std::optional<std::string_view> label_before,
                                   std::optional<std::string_view> id_before) const noexcept {
  const std::optional<std::string_view> label = template_value(tmpl, count, CKA_LABEL);
  const std::optional<std::string_view> id = template_value(tmpl, count, CKA_ID);
  if (exposes(label ? label : label_before, id ? id : id_before)) return CKR_OK;
  return label || id ? CKR_ATTRIBUTE_VALUE_INVALID : CKR_TEMPLATE_INCOMPLETE;
}

std::string ObjectFilter::describe() const {
  std::string out;
  for (const Label& l : labels_) {
    out += out.empty() ? "" : ",";
    out += "label:" + l.value + (l.prefix ? "*" : "");
  }
  for (const std::string& i : ids_) {
    out += out.empty() ? "" : ",";
    out += "id:" + hex(i);
  }
  return out;
}

}  // namespace p11mux
