// Clang's thread-safety analysis (-Wthread-safety): the attributes that tell
// it which lock guards which field and which function takes or needs which
// lock, so that a field touched without its lock fails the clang CI build
// (scripts/test.sh, P11MUX_THREAD_SAFETY). Compile-time only: they generate
// no code, and under GCC they are empty.
// https://clang.llvm.org/docs/ThreadSafetyAnalysis.html
#pragma once

#if defined(__clang__)
#define P11MUX_TSA(x) __attribute__((x))
#else
#define P11MUX_TSA(x)
#endif

#define CAPABILITY(name) P11MUX_TSA(capability(name))
#define SCOPED_CAPABILITY P11MUX_TSA(scoped_lockable)
#define GUARDED_BY(x) P11MUX_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) P11MUX_TSA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) P11MUX_TSA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) P11MUX_TSA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) P11MUX_TSA(requires_capability(__VA_ARGS__))
#define ACQUIRE(...) P11MUX_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) P11MUX_TSA(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) P11MUX_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) P11MUX_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) P11MUX_TSA(assert_capability(x))
#define RETURN_CAPABILITY(x) P11MUX_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS P11MUX_TSA(no_thread_safety_analysis)
