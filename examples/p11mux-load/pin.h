// Where the PIN comes from: --pin, else $P11MUX_LOAD_PIN, else the terminal.
#pragma once

#include <optional>
#include <string>

namespace p11mux::load {

// Prompts on /dev/tty with echo off. Throws SetupError when there is no
// terminal to ask (a script must then pass --pin or P11MUX_LOAD_PIN).
std::string prompt_pin(const std::string& token_label);

// Overwrites the string's characters so the PIN does not linger in freed memory.
void wipe(std::string& secret) noexcept;

}  // namespace p11mux::load
