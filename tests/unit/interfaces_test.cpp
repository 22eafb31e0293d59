// Which interfaces a backend offers (backend_interfaces.hpp), found over a
// fake module without loading one, and which p11mux offers and picks for
// C_GetInterfaceList and C_GetInterface given those (entry/interfaces.hpp).
#include "entry/interfaces.hpp"
#include "backend_interfaces.hpp"
#include "entry/entry_points.hpp"
#include "fake_module.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <vector>

namespace p11mux {
namespace {

// A vendor interface's function list: any layout, starting with its version.
struct VendorList {
  CK_VERSION version;
  void* functions[2];
};
VendorList vendor_list{{1, 0}, {nullptr, nullptr}};
VendorList vendor_list_2{{2, 1}, {nullptr, nullptr}};

BackendInterfaces discover() { return discover_interfaces(SharedLibrary(&fake::lookup)); }

TEST_CASE("a module without C_GetInterface is a 2.x module") {
  fake::reset();
  BackendInterfaces found = discover();
  CHECK(found.v3 == nullptr);
  CHECK(found.vendor.empty());
}

TEST_CASE("a 3.0 module: the \"PKCS 11\" 3.0 list, as C_GetInterface returned it") {
  fake::reset_v3();
  BackendInterfaces found = discover();
  CHECK(found.v3 == &fake::list_3_0);
  CHECK(found.vendor.empty());
}

TEST_CASE("spec bender: a 2.x list returned for a 3.0 request is not taken for a 3.0 one") {
  // Reading the v3.0 tail of a CK_FUNCTION_LIST-sized table reads past it.
  fake::reset();
  fake::module.has_get_interface = true;
  CK_INTERFACE wrong{fake::utf8("PKCS 11"), &fake::list_2_40, 0};
  fake::module.standard_answer = &wrong;
  fake::module.interfaces.push_back(wrong);
  CHECK(discover().v3 == nullptr);
  // Nor a NULL function list.
  CK_INTERFACE empty{fake::utf8("PKCS 11"), nullptr, 0};
  fake::module.standard_answer = &empty;
  CHECK(discover().v3 == nullptr);
}

TEST_CASE("spec bender: a vendor interface returned for the \"PKCS 11\" 3.0 request is not used") {
  // Its table has the vendor's layout: calling it as CK_FUNCTION_LIST_3_0 would
  // jump to whatever sits at each offset.
  fake::reset();
  fake::module.has_get_interface = true;
  VendorList vendor_3_0{{3, 0}, {nullptr, nullptr}};
  CK_INTERFACE vendor{fake::utf8("Vendor X"), &vendor_3_0, 0};
  fake::module.standard_answer = &vendor;
  fake::module.interfaces.push_back(vendor);
  BackendInterfaces found = discover();
  CHECK(found.v3 == nullptr);
  REQUIRE(found.vendor.size() == 1);  // still offered, as the vendor interface it is
}

TEST_CASE("a module offering only a later 3.x: its list extends the 3.0 layout") {
  fake::reset();
  fake::module.has_get_interface = true;
  CK_FUNCTION_LIST_3_0 list_3_1 = fake::list_3_0;  // a 3.1 list begins as a 3.0 one
  list_3_1.version = {3, 1};
  fake::module.interfaces.push_back({fake::utf8("PKCS 11"), &list_3_1, 0});
  CHECK(discover().v3 == &list_3_1);
}

TEST_CASE("vendor interfaces: the module's own objects, once each, unusable entries skipped") {
  fake::reset_v3();
  fake::module.interfaces.push_back({fake::utf8("Vendor X"), &vendor_list, 0});
  fake::module.interfaces.push_back({fake::utf8("Vendor Y"), nullptr, 0});  // no function list
  fake::module.interfaces.push_back({nullptr, &vendor_list, 0});            // no name
  fake::module.interfaces.push_back(
      {fake::utf8("Vendor Z"), &vendor_list_2, CKF_INTERFACE_FORK_SAFE});
  BackendInterfaces found = discover();
  CHECK(found.v3 == &fake::list_3_0);
  REQUIRE(found.vendor.size() == 2);
  // Not the list's copies: pointers into the module, valid while it is loaded.
  CHECK(found.vendor[0] == &fake::module.interfaces[2]);
  CHECK(found.vendor[1] == &fake::module.interfaces[5]);
}

TEST_CASE("a C_GetInterfaceList that fails or claims absurd counts offers no vendor interface") {
  fake::reset_v3();
  fake::module.interfaces.push_back({fake::utf8("Vendor X"), &vendor_list, 0});
  fake::module.listed_count_override = 100000;  // more than p11mux allocates for
  BackendInterfaces found = discover();
  CHECK(found.v3 == &fake::list_3_0);  // from C_GetInterface
  CHECK(found.vendor.empty());
}

TEST_CASE("p11mux offers 3.0 only over a 3.0 backend, and vendor interfaces only when passed") {
  const CK_INTERFACE* v3 = entry_points::interface_3_0();
  const CK_INTERFACE* v2 = entry_points::interface_2_40();
  CHECK(interface_version(*v3).major == 3);
  CHECK(interface_version(*v3).minor == 0);
  CHECK(interface_version(*v2).major == 2);
  CHECK(interface_version(*v2).minor == 40);
  CHECK(v3->flags == 0);  // never CKF_INTERFACE_FORK_SAFE
  CHECK(v2->flags == 0);

  CHECK(offered_interfaces(nullptr, VendorInterfaces::pass) ==
        std::vector<const CK_INTERFACE*>{v2});
  BackendInterfaces v2_backend;
  CHECK(offered_interfaces(&v2_backend, VendorInterfaces::hide) ==
        std::vector<const CK_INTERFACE*>{v2});
  CK_INTERFACE vendor{fake::utf8("Vendor X"), &vendor_list, 0};
  BackendInterfaces v3_backend{&fake::list_3_0, {&vendor}};
  CHECK(offered_interfaces(&v3_backend, VendorInterfaces::hide) ==
        std::vector<const CK_INTERFACE*>{v3, v2});
  CHECK(offered_interfaces(&v3_backend, VendorInterfaces::pass) ==
        std::vector<const CK_INTERFACE*>{v3, v2, &vendor});
  // Never p11mux's 3.0 list in front of a 2.x backend, even one with vendor interfaces.
  v2_backend.vendor = {&vendor};
  CHECK(offered_interfaces(&v2_backend, VendorInterfaces::pass) ==
        std::vector<const CK_INTERFACE*>{v2, &vendor});
}

TEST_CASE("C_GetInterface: name, version and flags select among those offered") {
  const CK_INTERFACE* v3 = entry_points::interface_3_0();
  const CK_INTERFACE* v2 = entry_points::interface_2_40();
  CK_INTERFACE vendor{fake::utf8("Vendor X"), &vendor_list, CKF_INTERFACE_FORK_SAFE};
  BackendInterfaces backend{&fake::list_3_0, {&vendor}};
  const auto offered = offered_interfaces(&backend, VendorInterfaces::pass);
  CK_UTF8CHAR* standard = fake::utf8("PKCS 11");

  // The default: the first standard one, the highest version.
  CHECK(select_interface(offered, nullptr, nullptr, 0) == v3);
  CHECK(select_interface(offered, standard, nullptr, 0) == v3);
  CK_VERSION v240{2, 40}, v30{3, 0}, v31{3, 1}, v10{1, 0};
  CHECK(select_interface(offered, nullptr, &v240, 0) == v2);
  CHECK(select_interface(offered, standard, &v30, 0) == v3);
  CHECK(select_interface(offered, standard, &v31, 0) == nullptr);
  // A NULL name never picks a vendor interface, whose list is not a
  // CK_FUNCTION_LIST, even when only it matches.
  CHECK(select_interface(offered, nullptr, &v10, 0) == nullptr);
  CHECK(select_interface(offered, fake::utf8("Vendor X"), &v10, 0) == &vendor);
  CHECK(select_interface(offered, fake::utf8("Vendor X"), nullptr, CKF_INTERFACE_FORK_SAFE) ==
        &vendor);
  // p11mux claims no fork safety; a request for it matches none of its own.
  CHECK(select_interface(offered, standard, nullptr, CKF_INTERFACE_FORK_SAFE) == nullptr);
  CHECK(select_interface(offered, fake::utf8("Vendor Y"), nullptr, 0) == nullptr);

  // Over a 2.x backend a 3.0 request finds nothing.
  const auto only_2 = offered_interfaces(nullptr, VendorInterfaces::hide);
  CHECK(select_interface(only_2, nullptr, &v30, 0) == nullptr);
  CHECK(select_interface(only_2, nullptr, nullptr, 0) == v2);
}

}  // namespace
}  // namespace p11mux
