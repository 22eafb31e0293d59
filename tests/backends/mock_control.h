/* Control interface of the p11mux test backend, libp11mux-mock.so, and of
 * libp11mux-race-detector.so.
 *
 * The mock is a PKCS#11 v2.40 module (optionally v3.0) with fake but checkable
 * crypto, and the instrument for p11mux's own tests: it counts calls and
 * detects calls that overlap where they must not. Load it with dlopen() (the
 * same path p11mux is given, so both see one instance) and reach these
 * functions with dlsym(), or all at once through mock_get_control().
 *
 * Plain C, no PKCS#11 header needed: every CK_ULONG-like value is an
 * unsigned long (the module assumes LP64, where CK_ULONG is unsigned long).
 *
 * Typical test fixture:
 *     void* lib = dlopen(MOCK_PATH, RTLD_NOW | RTLD_LOCAL);
 *     const MockControl* mock = ((MockGetControlFn)dlsym(lib, "mock_get_control"))();
 *     mock->reset();                        // defaults, zero counters, no objects
 *     MockConfig cfg = {0};                 // zero means default everywhere
 *     cfg.call_spin_us = 50;
 *     mock->configure(&cfg);
 *     ... exercise p11mux ...
 *     MockStats st; mock->stats(&st);
 *     CHECK(st.session_violations == 0);
 *
 * The library is linked with -z nodelete: its state survives every dlclose(),
 * so a test must call mock_reset() itself to start clean.
 *
 * libp11mux-race-detector.so is the same module built so that it reports
 * itself not thread-safe unless configured otherwise: C_Initialize with
 * CKF_OS_LOCKING_OK or with mutex callbacks returns CKR_CANT_LOCK, NULL
 * arguments succeed, and every overlap of two calls in the library or on one
 * session is counted (MockStats.library_violations, .session_violations).
 * A program that only knows PKCS#11 (P11MUX_MODULE=.../libp11mux-race-detector.so)
 * thus gets the race detector; a test reads the counters with mock_stats().
 * It is a separate library with its own state, not the mock under another name.
 *
 * libp11mux-spec-bender.so is the same module again, with every "bend" of
 * MockConfig.bend on by default: it misbehaves the way real vendor modules do
 * (SoftHSM2, NSS softoken), within what an application can cope with, so
 * that p11mux's promises can be tested over a backend that does not keep the
 * spec's. It keeps operations active after errors, fills ulValueLen on
 * CKR_BUFFER_TOO_SMALL, reuses handle numbers at once, returns the keys of
 * the SSL3/TLS key-and-MAC derivations inside the mechanism parameter, answers
 * CKR_SESSION_COUNT now and then below the limit, and opens sessions slowly.
 * It is thread-safe (every locking form accepted), with its own state.
 */
#ifndef P11MUX_MOCK_CONTROL_H
#define P11MUX_MOCK_CONTROL_H

#ifdef __cplusplus
extern "C" {
#endif

/* MockConfig.accept_locking: which C_Initialize forms succeed (others fail
 * with CKR_CANT_LOCK). 0 means MOCK_LOCK_ALL in libp11mux-mock.so and
 * MOCK_LOCK_NONE in libp11mux-race-detector.so (see below).
 *   OS:        CKF_OS_LOCKING_OK set (with or without the four callbacks)
 *   CALLBACKS: flag clear, all four mutex callbacks set. The mock calls
 *              CreateMutex+LockMutex+UnlockMutex once in C_Initialize (the
 *              result is returned if not CKR_OK) and DestroyMutex in
 *              C_Finalize; it never depends on them for its own safety.
 *   NONE:      NULL pInitArgs, or flag clear and no callbacks. The library is
 *              then "not thread-safe": any two calls overlapping in time are
 *              counted in MockStats.library_violations.
 * Flag set AND callbacks set is accepted if OS or CALLBACKS is accepted.
 * Some but not all callbacks set: CKR_ARGUMENTS_BAD.
 * A non-NULL pReserved is accepted (like NSS softoken) and copied to
 * MockStats.init_reserved as a C string. */
#define MOCK_LOCK_OS 0x1UL
#define MOCK_LOCK_CALLBACKS 0x2UL
#define MOCK_LOCK_NONE 0x4UL
#define MOCK_LOCK_ALL 0x7UL

/* Number of entries in MockStats.calls: the 68 v2.40 functions followed by the
 * 24 v3.0 additions, in CK_FUNCTION_LIST_3_0 order (C_Initialize = 0,
 * C_WaitForSlotEvent = 67, C_GetInterfaceList = 68 ... C_MessageVerifyFinal = 91). */
#define MOCK_FUNCTION_COUNT 92

/* Handles: sessions count up from MOCK_SESSION_HANDLE_BASE, objects from
 * MOCK_OBJECT_HANDLE_BASE; neither is ever reused until mock_reset() (unless
 * MOCK_BEND_REUSE_HANDLES). */
#define MOCK_SESSION_HANDLE_BASE 0x5000UL
#define MOCK_OBJECT_HANDLE_BASE 0x0B000000UL

/* Initial PINs of every token (C_SetPIN / C_InitPIN change them until
 * mock_reset()). CKU_USER uses the user PIN, CKU_SO and C_InitToken the SO PIN. */
#define MOCK_USER_PIN "1234"
#define MOCK_SO_PIN "0000"

/* Length of every digest and signature the mock produces. */
#define MOCK_DIGEST_LEN 32

/* mock_token_user() when nobody is logged in on the token. */
#define MOCK_NOBODY (~0UL)

/* MockConfig.bend: deviations from the spec that real modules show, one bit
 * each. 0 means the library's default: none in libp11mux-mock.so and
 * libp11mux-race-detector.so, MOCK_BEND_ALL in libp11mux-spec-bender.so;
 * MOCK_BEND_OBEY (alone) means none in every library.
 *   KEEP_OP: an error in an Update, Final, single-part (C_Digest, C_Sign,
 *     C_Verify, C_Encrypt ...) or C_DigestKey call leaves the operation
 *     active (the spec says it ends it; SoftHSM2 2.6 keeps a digest after
 *     C_DigestKey fails with CKR_KEY_HANDLE_INVALID): the next Init answers
 *     CKR_OPERATION_ACTIVE and C_DigestFinal digests the data so far. Injected
 *     failures (fail_function) keep it active too.
 *   FILL_LEN: C_GetAttributeValue with a buffer too small sets ulValueLen to
 *     the length needed (not CK_UNAVAILABLE_INFORMATION), CKR_BUFFER_TOO_SMALL.
 *   REUSE_HANDLES: a new session or object gets the lowest free handle number
 *     (from the bases above) at once, like SoftHSM2 after re-initialization.
 *   KEY_MAT: C_DeriveKey with CKM_SSL3_KEY_AND_MAC_DERIVE,
 *     CKM_TLS_KEY_AND_MAC_DERIVE or CKM_TLS12_KEY_AND_MAC_DERIVE (parameter
 *     CK_SSL3_KEY_MAT_PARAMS / CK_TLS12_KEY_MAT_PARAMS) creates up to four
 *     SESSION secret keys (MAC keys if ulMacSizeInBits, cipher keys if
 *     ulKeySizeInBits; CKA_TOKEN is forced false) and returns their handles in
 *     *pReturnedKeyMaterial, never through phKey, like NSS softoken. Without
 *     the bit these mechanisms are CKR_MECHANISM_INVALID. (The spec allows
 *     this; the bend is that it is the only derivation whose keys p11mux cannot
 *     see in phKey.)
 *   TRANSIENT_COUNT: every transient_count_every-th C_OpenSession that would
 *     succeed answers CKR_SESSION_COUNT instead (the next one succeeds).
 *   SLOW_OPEN: when open_session_us is 0, C_OpenSession sleeps
 *     MOCK_BEND_SLOW_OPEN_US.
 * The environment variable MOCK_BEND (see below) sets it too. */
#define MOCK_BEND_KEEP_OP 0x1UL
#define MOCK_BEND_FILL_LEN 0x2UL
#define MOCK_BEND_REUSE_HANDLES 0x4UL
#define MOCK_BEND_KEY_MAT 0x8UL
#define MOCK_BEND_TRANSIENT_COUNT 0x10UL
#define MOCK_BEND_SLOW_OPEN 0x20UL
#define MOCK_BEND_ALL 0x3fUL
#define MOCK_BEND_OBEY 0x80000000UL
/* transient_count_every = 0 means this; MOCK_BEND_SLOW_OPEN's sleep. */
#define MOCK_BEND_TRANSIENT_COUNT_EVERY 16UL
#define MOCK_BEND_SLOW_OPEN_US 200UL

/* Configuration. A zero-filled struct gives the default of every field. */
typedef struct MockConfig {
  /* Read at C_Initialize. */
  unsigned long accept_locking; /* MOCK_LOCK_* bits; 0 = the library's default */
  unsigned long slot_count;     /* slots 0..n-1, token present, label
                                   "mock-token-N"; 0 = 1 */
  /* Read on every call: changing them while initialized takes effect at once. */
  unsigned long max_sessions;               /* per token; beyond it C_OpenSession returns
                                               CKR_SESSION_COUNT; 0 = unlimited */
  unsigned long token_max_session_count;    /* reported as-is in CK_TOKEN_INFO */
  unsigned long token_max_rw_session_count; /* (0 = CK_EFFECTIVELY_INFINITE) */
  unsigned long call_spin_us;               /* every session call stays this long inside the
                                               library (busy-wait up to 100 us, sleep above) */
  unsigned long slow_us;                    /* extra sleep in C_GenerateRandom, C_Digest, C_Sign */
  unsigned long open_session_us;            /* extra sleep in C_OpenSession and C_Login
                                               (network HSM round trip) */
  char fail_function[64];                   /* e.g. "C_Sign"; "" = no failure injection */
  unsigned long fail_rv;                    /* what it returns instead of doing its work */
  unsigned long fail_nth;                   /* 0 = every call; N = only the Nth call after
                                               mock_configure() (1-based) */
  int provide_v3;                           /* 1: C_GetInterfaceList/C_GetInterface offer
                                               "PKCS 11" 3.0 (default) and 2.40; C_GetInfo
                                               reports 3.0; C_xxxInit(NULL mechanism)
                                               cancels. 0: both return
                                               CKR_FUNCTION_NOT_SUPPORTED (the symbols are
                                               always exported) */
  int wait_blocking_unsupported;            /* 1: C_WaitForSlotEvent without CKF_DONT_BLOCK
                                               returns CKR_FUNCTION_NOT_SUPPORTED (like
                                               SoftHSM2); 0 = it blocks */
  /* Appended for the spec-bending backend; read on every call. */
  unsigned long bend;                  /* MOCK_BEND_* bits; 0 = the library's default */
  unsigned long transient_count_every; /* MOCK_BEND_TRANSIENT_COUNT period; 0 =
                                          MOCK_BEND_TRANSIENT_COUNT_EVERY */
} MockConfig;

/* Environment: for programs that cannot call mock_configure() (p11mux-load,
 * scripts/bench.sh), each of these that is set is read by C_Initialize and
 * overrides its field (until the next mock_configure() or mock_reset()); a
 * value that is not a whole number makes C_Initialize fail with
 * CKR_GENERAL_ERROR, a line on stderr and nothing changed.
 *   MOCK_CALL_SPIN_US -> call_spin_us
 *   MOCK_SLOW_US -> slow_us
 *   MOCK_OPEN_SESSION_US -> open_session_us
 *   MOCK_TRANSIENT_COUNT_EVERY -> transient_count_every
 *   MOCK_BEND -> bend: a number (decimal or 0x...), or names separated by
 *     commas: keep-op, fill-len, reuse-handles, key-mat, transient-count,
 *     slow-open, all, none (= MOCK_BEND_OBEY); e.g. MOCK_BEND=keep-op,fill-len
 * Example: MOCK_OPEN_SESSION_US=1000 p11mux-load --module libp11mux-mock.so ...
 * is a network HSM whose C_OpenSession takes 1 ms. */

/* Where an injected failure happens: after the initialized check and, for
 * session calls, after the session lookup, the overlap accounting and the
 * call_spin_us wait; the function then returns fail_rv without doing anything
 * else, except that the operation it continues ends (as any error would;
 * with MOCK_BEND_KEEP_OP it stays active). The Nth count restarts with every
 * mock_configure(). */

/* Counters and records. All counters are cumulative since mock_reset(). */
typedef struct MockStats {
  int initialized;
  /* Last successful C_Initialize */
  int init_null_args;         /* pInitArgs was NULL */
  int init_had_callbacks;     /* all four mutex callbacks were set */
  unsigned long init_locking; /* the MOCK_LOCK_* form that was accepted */
  unsigned long init_flags;   /* CK_C_INITIALIZE_ARGS.flags (0 for NULL args) */
  char init_reserved[256];    /* copy of pReserved ("" if NULL), truncated */

  unsigned long initialize_calls; /* every C_Initialize call */
  unsigned long initialize_ok;
  unsigned long finalize_calls; /* every C_Finalize call */

  unsigned long sessions_open; /* now, all slots */
  unsigned long sessions_opened_total;
  unsigned long sessions_closed_total;       /* C_CloseSession + C_CloseAllSessions */
  unsigned long sessions_closed_by_finalize; /* left open at C_Finalize */
  unsigned long sessions_dropped;            /* by mock_drop_sessions() */
  unsigned long session_objects;             /* alive now */
  unsigned long token_objects;               /* alive now */

  unsigned long calls_total;          /* every call of every function */
  unsigned long max_concurrent_calls; /* peak number of threads inside at once */

  /* Two calls inside the library at once while it was initialized with the
   * NONE form (a blocked C_WaitForSlotEvent counts as inside). */
  unsigned long library_violations;
  /* Two calls on the same session at once (C_CloseSession and
   * C_CloseAllSessions included); always checked. */
  unsigned long session_violations;
  /* C_Finalize entered while another thread was inside a call (threads
   * blocked in C_WaitForSlotEvent excepted: the spec lets them be woken). */
  unsigned long finalize_during_call;
  /* Calls other than C_Initialize/C_GetFunctionList/C_GetInterface* while not
   * initialized (before the first C_Initialize too): each returned
   * CKR_CRYPTOKI_NOT_INITIALIZED. */
  unsigned long calls_after_finalize;

  unsigned long last_session;    /* handle passed to the last session call */
  unsigned long last_random_len; /* ulRandomLen of the last C_GenerateRandom */

  unsigned long calls[MOCK_FUNCTION_COUNT]; /* per function, by function index */

  /* Appended for the spec-bending backend. */
  unsigned long sessions_open_peak;  /* most sessions open at once, all slots */
  unsigned long bend_ops_kept;       /* KEEP_OP: operations left active by an error */
  unsigned long bend_lengths_filled; /* FILL_LEN: ulValueLen filled on a short buffer */
  unsigned long bend_handles_reused; /* REUSE_HANDLES: handle numbers handed out again */
  unsigned long bend_key_mat_keys;   /* KEY_MAT: keys returned in a mechanism parameter */
  unsigned long bend_session_count;  /* TRANSIENT_COUNT: CKR_SESSION_COUNT below the limit */
} MockStats;

/* Sets the configuration (NULL = defaults). Returns 0, or -1 if fail_function
 * names no PKCS#11 function (the configuration is then unchanged). */
int mock_configure(const MockConfig* config);
/* Fills *out. Counters are read one by one (relaxed atomics): exact once the
 * calls being counted have returned. */
void mock_stats(MockStats* out);
/* Back to the state after loading: default configuration, counters zero, no
 * objects, PINs and labels restored, pending slot events dropped, handles
 * restart at the bases. Meant to be called while not initialized (returns 0);
 * if it is initialized it is finalized first, without counting, and 1 is
 * returned so the test can flag the leak. Must not race with other calls. */
int mock_reset(void);
/* Calls of one function by name ("C_Sign"); ~0UL if the name is unknown. */
unsigned long mock_calls(const char* function_name);
/* Name of function index i ("C_Initialize" for 0), NULL if out of range. */
const char* mock_function_name(unsigned long index);
/* Marks a slot event pending (wakes blocked C_WaitForSlotEvent callers). Pending
 * events are delivered lowest slot first and dropped by C_Finalize. */
void mock_trigger_slot_event(unsigned long slot_id);
/* Calls Notify(backend_handle, event, pApplication) for every open session that
 * was opened with a Notify callback, outside all mock locks; returns how many. */
unsigned long mock_fire_notify(unsigned long event);
/* Simulates a device restart: every session disappears (its session objects
 * and the login state with it); later calls on those handles return
 * CKR_SESSION_HANDLE_INVALID. Returns how many sessions were dropped. */
unsigned long mock_drop_sessions(void);
/* Who is logged in on the token of a slot: CKU_SO (0), CKU_USER (1) or
 * MOCK_NOBODY (also for an invalid slot or when not initialized). */
unsigned long mock_token_user(unsigned long slot_id);

/* The fake crypto, for computing expected values:
 * digest(data) = 4 blocks of 8 bytes; block i (0..3) is FNV-1a-64 over the
 *   byte sequence (i, data...), stored little-endian. Every mechanism.
 * signature(key, data) = digest(8 bytes of key_id little-endian || data).
 *   key_id is the key's handle; for a pair from C_GenerateKeyPair both halves
 *   use the PRIVATE key's handle, so the public key verifies.
 * encryption = XOR of every byte with xor_byte(key_id) = (key_id % 255) + 1;
 *   the same key_id rule as signatures (encrypt with public, decrypt with
 *   private works). Output length = input length; *Final returns 0 bytes.
 * C_WrapKey / C_UnwrapKey: the key's CKA_VALUE encrypted as above with the
 *   wrapping key; the unwrapped key is a generic secret key (template applied).
 * C_DeriveKey: a generic secret key whose CKA_VALUE is digest(base key's
 *   CKA_VALUE || mechanism parameter bytes), template applied; the key-and-MAC
 *   derivations: see MOCK_BEND_KEY_MAT. */
void mock_reference_digest(const unsigned char* data, unsigned long len,
                           unsigned char out[MOCK_DIGEST_LEN]);
void mock_reference_signature(unsigned long key_id, const unsigned char* data, unsigned long len,
                              unsigned char out[MOCK_DIGEST_LEN]);
unsigned char mock_reference_xor_byte(unsigned long key_id);

typedef int (*MockConfigureFn)(const MockConfig*);
typedef void (*MockStatsFn)(MockStats*);
typedef int (*MockResetFn)(void);
typedef unsigned long (*MockCallsFn)(const char*);
typedef const char* (*MockFunctionNameFn)(unsigned long);
typedef void (*MockTriggerSlotEventFn)(unsigned long);
typedef unsigned long (*MockFireNotifyFn)(unsigned long);
typedef unsigned long (*MockDropSessionsFn)(void);
typedef unsigned long (*MockTokenUserFn)(unsigned long);
typedef void (*MockReferenceDigestFn)(const unsigned char*, unsigned long, unsigned char*);
typedef void (*MockReferenceSignatureFn)(unsigned long, const unsigned char*, unsigned long,
                                         unsigned char*);
typedef unsigned char (*MockReferenceXorByteFn)(unsigned long);

/* All of the above in one table: one dlsym("mock_get_control") is enough. */
typedef struct MockControl {
  MockConfigureFn configure;
  MockStatsFn stats;
  MockResetFn reset;
  MockCallsFn calls;
  MockFunctionNameFn function_name;
  MockTriggerSlotEventFn trigger_slot_event;
  MockFireNotifyFn fire_notify;
  MockDropSessionsFn drop_sessions;
  MockTokenUserFn token_user;
  MockReferenceDigestFn reference_digest;
  MockReferenceSignatureFn reference_signature;
  MockReferenceXorByteFn reference_xor_byte;
} MockControl;

const MockControl* mock_get_control(void);
typedef const MockControl* (*MockGetControlFn)(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* P11MUX_MOCK_CONTROL_H */
