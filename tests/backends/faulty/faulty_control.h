/* Control interface of libp11mux-faulty.so, the fault-injecting test backend.
 *
 * The faulty module is a PKCS#11 module that loads another one (the target:
 * SoftHSM2 by default, or the mock) and forwards every call to it, except
 * that, by configuration, it
 *   - returns a chosen CKR code instead of forwarding a call: on a given
 *     function (or on every function, "*") with a probability drawn from a
 *     seeded PRNG, or on the Nth call of that function;
 *   - refuses C_OpenSession with CKR_SESSION_COUNT beyond N open sessions;
 *   - simulates an HSM restart (faulty_restart): every open session
 *     disappears at once, its target session really closed; later calls on
 *     the old handles return CKR_SESSION_HANDLE_INVALID;
 *   - simulates a removed device (faulty_set_removed): session calls return
 *     CKR_DEVICE_REMOVED, token calls CKR_TOKEN_NOT_PRESENT;
 *   - adds latency to C_OpenSession, C_CloseSession, C_Login and the crypto
 *     calls, like a network HSM (the "slow" backend, over a real token);
 *   - aims faults at one slot while the others keep working (the members of
 *     an HSM group, issue 15): a chosen code, a removed token, a restart, a
 *     hang; see "Faults aimed at one slot" below and README.md.
 * It hands out its own session handles (never reused), so stale handles are
 * always recognised, and it counts what the tests assert on: sessions opened
 * and closed, faults injected, calls overlapping on one session.
 *
 * Configuration comes from the environment when the library is loaded and on
 * faulty_reset(), so that any program can use it through P11MUX_MODULE alone:
 *   P11MUX_FAULTY_TARGET  path of the target module
 *                         (default /usr/lib/softhsm/libsofthsm2.so)
 *   P11MUX_FAULTY_SEED    PRNG seed (default 1)
 *   P11MUX_FAULTY_FAIL    rules, comma-separated, FUNCTION:RV:p=PROBABILITY or
 *                         FUNCTION:RV:nth=N; FUNCTION is a name or "*", RV a
 *                         CKR_ name or a number; ":after" at the end forwards
 *                         the call before answering RV (FaultyRule.after).
 *                         Example:
 *                         "*:CKR_DEVICE_ERROR:p=0.01,C_OpenSession:CKR_DEVICE_MEMORY:nth=3"
 *   P11MUX_FAULTY_MAX_SESSIONS  CKR_SESSION_COUNT beyond this many (0 = no limit)
 *   P11MUX_FAULTY_MAX_SLOT_SESSIONS  the same on each slot (0 = no limit)
 *   P11MUX_FAULTY_LATENCY open=US,close=US,login=US,crypto=US (microseconds)
 *   P11MUX_FAULTY_MISSING  functions left NULL in the lists it hands out,
 *                         comma-separated names (a module lacking them); read
 *                         by C_GetFunctionList and C_GetInterface*
 *   P11MUX_FAULTY_SCHEDULE  slot faults at fixed times, comma-separated
 *                         SECONDS:slot=ID:ACTION, SECONDS after each successful
 *                         C_Initialize (a monotonic clock), ID the target's slot
 *                         ID, ACTION one of
 *                           removed, back      faulty_set_slot_removed(ID, 1 / 0)
 *                           restart            faulty_restart_slot(ID)
 *                           hang, hang=MS      faulty_hang_slot(ID, until
 *                                              released / MS)
 *                           release            faulty_release_slot(ID)
 *                           fail=RV            faulty_fail_slot(ID, RV), RV a
 *                                              CKR_ name or a number
 *                           clear              faulty_clear_slot(ID)
 *                         Example: "4:slot=1:removed,8:slot=1:back". Read by
 *                         C_Initialize and applied by a thread of the module
 *                         (no cost on the calls), which writes a line to stderr
 *                         for each fault, with the wall clock ("... at unix_ms
 *                         N") so that a benchmark can place it on its own
 *                         timeline; C_Finalize drops the faults not yet due.
 *                         With CKF_LIBRARY_CANT_CREATE_OS_THREADS, C_Initialize
 *                         answers CKR_NEED_TO_CREATE_THREADS.
 *                         For programs that cannot reach the control functions
 *                         (p11mux-load through p11mux: scripts/bench.sh, failover).
 * A malformed variable makes C_Initialize fail with CKR_GENERAL_ERROR and a
 * message on stderr.
 *
 * libp11mux-slow.so, the "slow" backend, is the same module built with one
 * difference: when P11MUX_FAULTY_LATENCY is unset its latency is
 * FAULTY_SLOW_LATENCY (a network HSM over SoftHSM2, or over the target
 * named) instead of none; P11MUX_FAULTY_LATENCY= (empty) turns it off. It is a
 * separate library with its own state and the same control functions. Tests can instead set
 * everything with faulty_configure() (reach it with dlopen of the same path p11mux is given, then
 * dlsym).
 *
 * Plain C, LP64 (CK_ULONG is unsigned long). The library is linked with
 * -z nodelete: its state survives dlclose.
 */
#ifndef P11MUX_FAULTY_CONTROL_H
#define P11MUX_FAULTY_CONTROL_H

#ifdef __cplusplus
extern "C" {
#endif

/* Entries in FaultyStats.calls/faults: the functions of CK_FUNCTION_LIST_3_0
 * in order (C_Initialize = 0 ... C_WaitForSlotEvent = 67 ... 91), the order of
 * include/p11mux/functions.h. */
#define FAULTY_FUNCTION_COUNT 92
#define FAULTY_MAX_RULES 8
/* Session handles the faulty module hands out count up from here. */
#define FAULTY_SESSION_HANDLE_BASE 0x7A000001UL
#define FAULTY_DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"
/* libp11mux-slow.so's latency (microseconds) when P11MUX_FAULTY_LATENCY is
 * unset: round trips to a network HSM for sessions and login, and a
 * half-millisecond for each crypto call. */
#define FAULTY_SLOW_LATENCY "open=2000,close=1000,login=2000,crypto=500"

/* One fault: the first rule (in array order) that fires wins. A fault
 * leaves the target and the application agreeing on whether an operation is
 * still active, as a real error would: on a call that ends an operation
 * (C_Sign, C_Digest, C_xxxFinal...) the call is forwarded and its answer
 * replaced, when it did end the operation (a length query does not); on any
 * other call the fault replaces the call.
 * "*" matches every function except C_Initialize, C_Finalize,
 * C_GetFunctionList, C_GetInterfaceList, C_GetInterface, C_CloseSession,
 * C_CloseAllSessions (a failed close leaves the target session open, which is
 * its own test: name C_CloseSession explicitly) and the calls that continue
 * an operation (C_xxxUpdate, C_FindObjects, C_DigestKey, message parts: an
 * error there would end the operation for the application only). */
typedef struct FaultyRule {
  char function[40];         /* "C_Sign", "*", or "" for an unused rule */
  unsigned long rv;          /* returned instead of forwarding the call */
  unsigned long per_million; /* probability, in millionths (used when nth == 0) */
  unsigned long nth;         /* only the Nth matching call since faulty_configure
                                (1-based); 0 = use per_million */
  unsigned long after;       /* 1: on a call that does not end an operation, the
                                call is forwarded first and its answer replaced
                                (the target did the work, its outputs written: a
                                module failing late); env: FUNCTION:RV:nth=N:after */
} FaultyRule;

typedef struct FaultyConfig {
  char target[512];   /* target module; "" = P11MUX_FAULTY_TARGET or the
                         default. Read by C_Initialize (and by
                         C_GetInterface* before it) */
  unsigned long seed; /* PRNG seed; draws restart at faulty_configure */
  FaultyRule rules[FAULTY_MAX_RULES];
  unsigned long max_sessions; /* 0 = no limit */
  /* Latency added before forwarding (microseconds; 0 = none). */
  unsigned long open_session_us;  /* C_OpenSession */
  unsigned long close_session_us; /* C_CloseSession */
  unsigned long login_us;         /* C_Login, C_Logout, C_LoginUser */
  unsigned long crypto_us;        /* every function named after Encrypt,
                                     Decrypt, Sign, Verify, Digest, Generate,
                                     Wrap, Derive, Random or Message */
  /* Nonzero: the faulty module holds one target session of its own on each
     slot it has opened a session on, from that first open until C_Finalize or
     C_CloseAllSessions, and a restart does not drop it. SoftHSM2 renumbers a
     slot's object handles when its last session closes (docs/pkcs11-facts.md,
     "Object handles"); with this set, a restart loses the sessions but the
     application's object handles stay valid, as on an HSM whose handles name
     stored objects. */
  int keep_object_handles;
  /* CKR_SESSION_COUNT beyond this many open sessions on one slot (0 = no
     limit), as each HSM of a group has its own limit; max_sessions still
     bounds them all. Appended: the fields above keep their places. */
  unsigned long max_sessions_per_slot;
} FaultyConfig;

typedef struct FaultyStats {
  int initialized;
  unsigned long initialize_calls, initialize_ok, finalize_calls;
  unsigned long calls_total;
  /* Answered CKR_CRYPTOKI_NOT_INITIALIZED; not C_WaitForSlotEvent, which the
   * spec lets race C_Finalize. */
  unsigned long calls_not_initialized;
  unsigned long max_concurrent_calls; /* threads inside at once (waiters included) */
  /* Two calls on one session at once, or a session closed (by
   * C_CloseAllSessions) while a call on it was in progress. */
  unsigned long session_violations;
  /* Calls inside (other than C_WaitForSlotEvent) when C_Finalize came. */
  unsigned long finalize_during_call;

  /* Sessions. Always: opened = closed + closed_all + dropped + open_at_finalize
   * + open. At the end of a clean run open_at_finalize is 0 (the proxy closed
   * everything it opened before finalizing). */
  unsigned long sessions_open;
  unsigned long sessions_opened;
  unsigned long sessions_closed;     /* C_CloseSession */
  unsigned long sessions_closed_all; /* C_CloseAllSessions */
  unsigned long sessions_dropped;    /* faulty_restart, faulty_set_removed */
  unsigned long sessions_open_at_finalize;
  unsigned long max_sessions_open;
  unsigned long stale_handle_calls;     /* calls on unknown or dropped handles */
  unsigned long session_count_refusals; /* CKR_SESSION_COUNT from max_sessions
                                           or max_sessions_per_slot */
  unsigned long restarts;
  unsigned long target_sessions_closed_by_restart;

  unsigned long faults_injected; /* by rules, all functions */
  unsigned long delayed_calls;   /* calls that got latency */
  unsigned long calls[FAULTY_FUNCTION_COUNT];
  unsigned long faults[FAULTY_FUNCTION_COUNT];
} FaultyStats;

/* Replaces the configuration (NULL: from the environment). Returns 0, or -1
 * if a rule names an unknown function (nothing changed then). Counters are
 * kept. May be called while initialized; takes effect at once. */
int faulty_configure(const FaultyConfig* config);
/* The configuration the environment describes; -1 (and *out untouched) if a
 * variable is malformed, with the reason in the text returned by
 * faulty_last_error(). */
int faulty_config_from_env(FaultyConfig* out);
const char* faulty_last_error(void);
void faulty_stats(FaultyStats* out);
/* Configuration from the environment, counters zero, device present, no slot
 * faults (calls hung on one go on). Call
 * while not initialized (returns 1 if it was: it then finalizes first). */
int faulty_reset(void);
/* HSM restart: every open session is dropped at once (target sessions closed
 * as soon as no call is inside them). Returns how many. */
unsigned long faulty_restart(void);
/* 1: device removed (also drops every session); 0: back. */
void faulty_set_removed(int removed);
/* Function name of index i, NULL if out of range; calls of a function by name
 * (~0UL if unknown). */
const char* faulty_function_name(unsigned long index);
unsigned long faulty_calls(const char* function_name);

/* ---- Faults aimed at one slot ----
 * A slot fault touches only the calls that concern that slot: C_GetSlotInfo,
 * C_GetTokenInfo, C_GetMechanismList, C_GetMechanismInfo, C_InitToken,
 * C_OpenSession and C_CloseAllSessions with its slot ID, and every call on a
 * session opened on it, C_CloseSession included. Calls on other slots, and
 * C_GetSlotList, C_WaitForSlotEvent and the lifecycle, go on as before. Slot
 * faults are set at run time (or at fixed times by P11MUX_FAULTY_SCHEDULE), may be set before
 * C_Initialize (a member down from the start) and survive C_Finalize and
 * C_Initialize; faulty_clear_slot and faulty_reset clear them. The faults of
 * one slot combine: a hang comes first, then a removal, then a failure code.
 * Release hung calls before C_Finalize: a call still waiting then reaches a
 * finalized target when it goes on. */

/* faulty_hang_slot: until faulty_release_slot (or faulty_clear_slot). */
#define FAULTY_HANG_UNTIL_RELEASED (~0UL)

/* rv != CKR_OK: every call concerning the slot answers rv (CKR_DEVICE_ERROR,
 * CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, ...) instead of reaching the
 * target; CKR_OK: no more. The slot's sessions stay open in the target, so
 * they work again once the code is cleared (restart the slot as well to lose
 * them). As with rules, a call that ends an operation (C_Sign, C_xxxFinal)
 * is forwarded and its answer replaced; a call that continues one
 * (C_xxxUpdate, C_FindObjects) is replaced, and the target's operation stays
 * active. */
void faulty_fail_slot(unsigned long slot, unsigned long rv);
/* 1: the slot's token is removed: its sessions are dropped (their target
 * sessions closed), calls on them answer CKR_DEVICE_REMOVED, C_OpenSession
 * and the token calls CKR_TOKEN_NOT_PRESENT, C_GetSlotInfo clears
 * CKF_TOKEN_PRESENT. 0: the token is back; the old handles then answer
 * CKR_SESSION_HANDLE_INVALID, new sessions work. */
void faulty_set_slot_removed(unsigned long slot, int removed);
/* A restart of the slot's token only: its sessions are dropped as by
 * faulty_restart (target sessions closed once no call is inside them; later
 * calls on the old handles answer CKR_SESSION_HANDLE_INVALID). Returns how
 * many. Nothing stays set: new sessions work at once. */
unsigned long faulty_restart_slot(unsigned long slot);
/* The slot stops answering: calls concerning it wait, from now for ms
 * milliseconds or, with FAULTY_HANG_UNTIL_RELEASED, until released; then they
 * go on (forwarded, unless another fault of the slot answers them). Calls on
 * other slots do not wait. A new hang replaces the old one's deadline. */
void faulty_hang_slot(unsigned long slot, unsigned long ms);
/* Ends the slot's hang; the calls waiting go on at once. Returns how many were
 * waiting. */
unsigned long faulty_release_slot(unsigned long slot);
/* Clears every fault of the slot (code, removal, hang: waiting calls go on). */
void faulty_clear_slot(unsigned long slot);

typedef struct FaultySlotStats {
  unsigned long sessions_open;    /* sessions on the slot now */
  unsigned long faults;           /* calls answered by a code or a removal */
  unsigned long hung_now;         /* calls waiting in a hang now */
  unsigned long hung_total;       /* calls that waited in a hang */
  unsigned long restarts;         /* faulty_restart_slot and removals */
  unsigned long sessions_dropped; /* by those (also in FaultyStats) */
} FaultySlotStats;
/* Counters of one slot since faulty_reset (zero for a slot never faulted). */
void faulty_slot_stats(unsigned long slot, FaultySlotStats* out);

typedef int (*FaultyConfigureFn)(const FaultyConfig*);
typedef int (*FaultyConfigFromEnvFn)(FaultyConfig*);
typedef const char* (*FaultyLastErrorFn)(void);
typedef void (*FaultyStatsFn)(FaultyStats*);
typedef int (*FaultyResetFn)(void);
typedef unsigned long (*FaultyRestartFn)(void);
typedef void (*FaultySetRemovedFn)(int);
typedef const char* (*FaultyFunctionNameFn)(unsigned long);
typedef unsigned long (*FaultyCallsFn)(const char*);
typedef void (*FaultyFailSlotFn)(unsigned long, unsigned long);
typedef void (*FaultySetSlotRemovedFn)(unsigned long, int);
typedef unsigned long (*FaultyRestartSlotFn)(unsigned long);
typedef void (*FaultyHangSlotFn)(unsigned long, unsigned long);
typedef unsigned long (*FaultyReleaseSlotFn)(unsigned long);
typedef void (*FaultyClearSlotFn)(unsigned long);
typedef void (*FaultySlotStatsFn)(unsigned long, FaultySlotStats*);

typedef struct FaultyControl {
  FaultyConfigureFn configure;
  FaultyConfigFromEnvFn config_from_env;
  FaultyLastErrorFn last_error;
  FaultyStatsFn stats;
  FaultyResetFn reset;
  FaultyRestartFn restart;
  FaultySetRemovedFn set_removed;
  FaultyFunctionNameFn function_name;
  FaultyCallsFn calls;
  /* Faults aimed at one slot (appended: the members above keep their places). */
  FaultyFailSlotFn fail_slot;
  FaultySetSlotRemovedFn set_slot_removed;
  FaultyRestartSlotFn restart_slot;
  FaultyHangSlotFn hang_slot;
  FaultyReleaseSlotFn release_slot;
  FaultyClearSlotFn clear_slot;
  FaultySlotStatsFn slot_stats;
} FaultyControl;

const FaultyControl* faulty_get_control(void);
typedef const FaultyControl* (*FaultyGetControlFn)(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* P11MUX_FAULTY_CONTROL_H */
