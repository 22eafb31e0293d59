// The Notify trampoline: the backend's notification reaches the application's
// callback with the virtual handle, and nobody once the session is closed
// (a backend may notify late; the entry may be free or reused without one).
#include "handled/handled.hpp"
#include "sessions/session_table.hpp"

#include <doctest/doctest.h>

namespace p11mux {
namespace {

struct Received {
  int calls = 0;
  CK_SESSION_HANDLE handle = 0;
  CK_NOTIFICATION event = 0;
  CK_VOID_PTR application = nullptr;
} received;

CK_RV record(CK_SESSION_HANDLE handle, CK_NOTIFICATION event, CK_VOID_PTR application) {
  received = {received.calls + 1, handle, event, application};
  return CKR_OK;
}

TEST_CASE(
    "notify trampoline: the application's callback with the virtual handle, none after close") {
  LockSource os;
  SessionTable table(os);
  int app_data = 0;
  SessionLease lease = table.reserve();
  Session* s = &*lease;
  const CK_SESSION_HANDLE virtual_handle = lease->opening_handle;
  lease->application.store(&app_data);
  lease->notify.store(&record);
  lease->anchor.backend = 0x7A000001;
  table.publish(*lease);

  received = {};
  CHECK(notify_trampoline(0x7A000001, CKN_SURRENDER, s) == CKR_OK);
  CHECK(received.calls == 1);
  CHECK(received.handle == virtual_handle);
  CHECK(received.event == CKN_SURRENDER);
  CHECK(received.application == &app_data);

  table.close(std::move(lease));
  CHECK(notify_trampoline(0x7A000001, CKN_SURRENDER, s) == CKR_OK);  // late: nobody called
  SessionLease reused = table.reserve();  // the same entry, opened without a callback
  CHECK(&*reused == s);
  CHECK(notify_trampoline(0x7A000001, CKN_SURRENDER, s) == CKR_OK);
  CHECK(received.calls == 1);
  table.discard(std::move(reused));
}

}  // namespace
}  // namespace p11mux
