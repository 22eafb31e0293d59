/* Control interface of libp11mux-recorder.so, a PKCS#11 3.0 test backend that
 * records the arguments of every call, so a test can check that p11mux
 * forwards each argument unchanged (only the session handle mapped).
 *
 * It answers every function with CKR_OK and touches no output except: the
 * session handle of C_OpenSession (RECORDER_SESSION_BASE counting up), a
 * zeroed CK_INFO (cryptoki 3.0) / CK_SLOT_INFO / CK_TOKEN_INFO / CK_SESSION_INFO
 * / CK_MECHANISM_INFO, one slot (0) from C_GetSlotList, an empty mechanism
 * list, CKR_NO_EVENT from C_WaitForSlotEvent, and C_GetAttributeValue's
 * lengths when recorder_set_attribute_length() asks for a lie. It is not initialized-aware.
 *
 * Interfaces, all flagged CKF_INTERFACE_FORK_SAFE (which a proxy must not
 * repeat for its own lists): "PKCS 11" 3.0 (the default), "PKCS 11" 2.40, and
 * RECORDER_VENDOR_INTERFACE 1.0 whose function list is RecorderVendorFunctions.
 *
 * Load it with dlopen() by the same path p11mux is given, so both see one
 * instance. Linked with -z nodelete: its records survive every dlclose. */
#ifndef P11MUX_RECORDER_CONTROL_H
#define P11MUX_RECORDER_CONTROL_H

#ifdef __cplusplus
extern "C" {
#endif

#define RECORDER_MAX_ARGS 10
#define RECORDER_SESSION_BASE 0x7000UL
#define RECORDER_VENDOR_INTERFACE "Vendor p11mux recorder"

/* The calls of one function since recorder_reset(), and the arguments of the
 * last one, each as an unsigned long (pointers by address). */
typedef struct RecorderCall {
  unsigned long count;
  unsigned long args[RECORDER_MAX_ARGS];
} RecorderCall;

/* Fills *out for the function named (e.g. "C_EncryptMessage"); returns 0, or
 * -1 if no PKCS#11 function has that name. */
int recorder_last_call(const char* function, RecorderCall* out);
/* Forgets every call and clears the length below; sessions count from
 * RECORDER_SESSION_BASE again. */
void recorder_reset(void);

/* A non-compliant C_GetAttributeValue, like some vendor modules: with a
 * length set, every attribute whose buffer (pValue not NULL) is shorter gets
 * that length in ulValueLen (the required length, where the spec says
 * CK_UNAVAILABLE_INFORMATION), nothing is written to its buffer, and the call
 * returns CKR_BUFFER_TOO_SMALL. 0 (the default) = off. */
void recorder_set_attribute_length(unsigned long length);

/* The vendor interface's function list: a CK_VERSION (1.0), then echo, which
 * returns value + 1 and is recorded under the name "echo". */
typedef struct RecorderVendorFunctions {
  unsigned char major, minor;
  unsigned long (*echo)(unsigned long value);
} RecorderVendorFunctions;

typedef int (*RecorderLastCallFn)(const char*, RecorderCall*);
typedef void (*RecorderResetFn)(void);
typedef void (*RecorderSetAttributeLengthFn)(unsigned long);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* P11MUX_RECORDER_CONTROL_H */
