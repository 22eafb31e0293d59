// p11mux-load: load and concurrency tester for any PKCS#11 module.
// Setup (module, token, login, keys) fails with exit status 2; the run's
// verdict is 0 (clean) or 1 (errors or failed checks). See --help.
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <random>

#include "ckr_names.h"
#include "keys.h"
#include "module.h"
#include "operations.h"
#include "p11mux_stats.h"
#include "pin.h"
#include "plan.h"
#include "report.h"
#include "runner.h"
#include "signals.h"
#include "stats.h"

namespace p11mux::load {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitSetup = 2;

void print_tokens(const Module& module) {
  std::cout << module.path() << ": " << module.description() << "\n";
  for (const TokenInfo& t : list_tokens(module)) {
    std::cout << "slot " << t.slot << "  " << t.slot_description << "\n";
    if (!t.present) {
      std::cout << "    (no token)\n";
      continue;
    }
    std::cout << "    token '" << t.label << "'  " << t.manufacturer << " " << t.model << "  serial "
              << t.serial << ((t.flags & CKF_LOGIN_REQUIRED) ? "  login required" : "")
              << ((t.flags & CKF_TOKEN_INITIALIZED) ? "" : "  NOT INITIALIZED") << "\n";
  }
}

// --pin, else $P11MUX_LOAD_PIN, else the PIN pad if the token has one, else a
// prompt. nullopt means "use the protected authentication path".
std::optional<std::string> resolve_pin(const Plan& plan, const TokenInfo& token) {
  if (plan.pin) return plan.pin;
  if (const char* env = std::getenv("P11MUX_LOAD_PIN")) return std::string(env);
  if (token.flags & CKF_PROTECTED_AUTHENTICATION_PATH) return std::nullopt;
  return prompt_pin(token.label);
}

std::uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

int run(const Plan& plan) {
  Module module(plan.module);
  if (plan.list_tokens) {
    print_tokens(module);
    return kExitOk;
  }
  const TokenInfo token = select_token(module, plan.token_label, plan.slot);
  CK_FUNCTION_LIST* f = module.fn();
  const bool progress = !plan.quiet && ::isatty(STDERR_FILENO);
  auto notice = [](const std::string& line) { std::cerr << "p11mux-load: " << line << "\n"; };

  // The setup session stays open for the whole run: it holds the login (which
  // ends when an application's last session on the token closes, as it would
  // between ops with --sessions per-op) and is the session of --sessions shared.
  Session anchor;
  try {
    anchor = Session(f, token.slot, CKF_RW_SESSION, "setup");
  } catch (const SetupError&) {
    anchor = Session(f, token.slot, 0, "setup");  // a write-protected token allows R/O only
  }

  std::optional<std::string> pin;
  const bool login_logout = plan.mix.contains(OpKind::login_logout);
  bool logged_in = false;
  if (plan.login) {
    pin = resolve_pin(plan, token);
    login_user(f, anchor.handle(), pin, token.label);
    if (login_logout) {
      // Prove the PIN once here: thousands of wrong attempts would lock it.
      check_rv(f->C_Logout(anchor.handle()), "C_Logout on token '" + token.label + "'");
    } else {
      logged_in = true;
    }
  }

  const Keys keys =
      prepare_keys(f, anchor.handle(), plan.mix, plan.create_keys, logged_in, token.label, notice);

  if (!module.thread_safe() && plan.threads > 1) {
    notice("warning: the module refused CKF_OS_LOCKING_OK (CKR_CANT_LOCK) and may not be thread-safe");
  }
  std::string crash =
      "while " + std::to_string(plan.threads) + " thread(s) were calling " + plan.module + ".";
  if (plan.sessions == SessionMode::shared && plan.threads > 1) {
    crash +=
        " With --sessions shared this is what a module that is not safe for concurrent calls on one "
        "session does (SoftHSM2 is one): run it behind a serializing proxy such as p11mux.";
  }
  install_crash_message(crash);

  RunContext ctx;
  ctx.fn = f;
  ctx.slot = token.slot;
  ctx.keys = &keys;
  ctx.mode = plan.sessions;
  ctx.shared_session = anchor.handle();
  ctx.verify_every = plan.verify_every;
  ctx.pin = &pin;
  ctx.iv_seed = random_seed();

  if (progress) {
    notice("running " + plan.mix.to_string() + " with " + std::to_string(plan.threads) +
           " thread(s) on token '" + token.label + "'; Ctrl-C stops early");
  }
  // --stats-url: p11mux's own figures beside ours, once a second and at the end.
  std::optional<StatsUrl> stats_url;
  std::optional<P11muxFigures> last_figures;
  auto last_time = std::chrono::steady_clock::now();
  auto fetch = [&]() -> std::optional<P11muxFigures> {
    std::string error;
    std::optional<std::string> text = fetch_metrics(*stats_url, std::chrono::milliseconds(500), &error);
    std::optional<P11muxFigures> figures = text ? parse_metrics(*text) : std::nullopt;
    if (!figures && !plan.quiet) {
      notice("--stats-url: " + (text ? std::string("no p11mux metrics in the reply") : error));
    }
    return figures;
  };
  if (plan.stats_url) {
    stats_url = parse_stats_url(*plan.stats_url);
    last_figures = fetch();
  }
  std::function<void()> each_second;
  if (stats_url && !plan.quiet) {
    each_second = [&] {
      std::optional<P11muxFigures> now = fetch();
      auto t = std::chrono::steady_clock::now();
      if (now && last_figures) {
        std::cerr << live_line(*last_figures, *now, std::chrono::duration<double>(t - last_time).count())
                  << "\n";
      }
      if (now) last_figures = now;
      last_time = t;
    };
  }
  RunOutput out = run_load(plan, ctx, progress, each_second);
  Summary summary = merge_stats(plan.mix, out.threads);
  summary.elapsed = out.elapsed;
  summary.interrupted = out.interrupted;
  if (out.timeline) {
    summary.timeline = out.timeline->report(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(out.elapsed)));
  }
  if (pin) wipe(*pin);

  RunInfo info{module.path(), module.description(), token.label, token.slot, logged_in, module.thread_safe()};
  if (plan.json) {
    print_json(std::cout, plan, info, summary);
  } else {
    print_human(std::cout, plan, info, summary);
    if (stats_url) {
      if (std::optional<P11muxFigures> figures = fetch()) std::cout << final_line(*figures) << "\n";
    }
  }
  std::cout.flush();
  return summary.failed() ? kExitFailed : kExitOk;
}

}  // namespace
}  // namespace p11mux::load

int main(int argc, char** argv) {
  using namespace p11mux::load;
  try {
    ParseResult parsed = parse_command_line(argc, argv);
    if (parsed.kind != ParseResult::Kind::run) {
      std::cout << parsed.text;
      return kExitOk;
    }
    return run(parsed.plan);
  } catch (const UsageError& e) {
    std::cerr << "p11mux-load: error: " << e.what() << "\n";
  } catch (const SetupError& e) {
    std::cerr << "p11mux-load: error: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "p11mux-load: error: " << e.what() << "\n";
  }
  return kExitSetup;
}
