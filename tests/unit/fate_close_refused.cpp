// Built, not run, by the fate-close-refused test (CMakeLists.txt here): a
// SessionPool::Fate of kind close made without its reason must not compile
// (Fate::closed(why) is the way to one). The test builds this target and
// passes only on the compiler's refusal naming the reason.
#include "sessions/session_pool.hpp"

namespace p11mux {

SessionPool::Fate reasonless_close() { return SessionPool::Fate::close; }

}  // namespace p11mux
