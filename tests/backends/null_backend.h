/* libp11mux-null.so, the "null" test backend: a PKCS#11 3.0 module in which
 * every call succeeds at once. It measures p11mux's own cost per call
 * (tests/bench/null_overhead.cpp) and gives the fuzzer a backend that never
 * refuses (tests/fuzz).
 *
 * Every function returns CKR_OK, keeps no state but two handle counters, and
 * checks nothing. C_Initialize accepts every form (it is thread-safe). The
 * outputs are plausible, so a caller can go on with them:
 *   - one slot (0), a token present labelled NULL_TOKEN_LABEL, no session
 *     limit, one mechanism (CKM_SHA256);
 *   - session handles from NULL_SESSION_HANDLE_BASE and object handles (every
 *     CK_OBJECT_HANDLE output) from NULL_OBJECT_HANDLE_BASE, counting up;
 *   - C_FindObjects finds nothing; C_GetAttributeValue gives every attribute
 *     an empty value; C_GetObjectSize says NULL_OUTPUT_LEN;
 *   - every byte output (digests, signatures, ciphertext, wrapped keys,
 *     operation state) is NULL_OUTPUT_LEN zero bytes: a NULL buffer asks for
 *     that length, a shorter one gets CKR_BUFFER_TOO_SMALL, as the spec says;
 *   - C_GenerateRandom gives a count of the calling thread's calls (8 bytes,
 *     little-endian) then zeros: never the same twice in a row on a thread;
 *   - C_WaitForSlotEvent reports slot 0 at once.
 * Interfaces: "PKCS 11" 3.0 (the default) and 2.40; C_GetFunctionList gives
 * the 2.40 list. */
#ifndef P11MUX_NULL_BACKEND_H
#define P11MUX_NULL_BACKEND_H

#define NULL_TOKEN_LABEL "null-token"
#define NULL_OUTPUT_LEN 32UL
#define NULL_SESSION_HANDLE_BASE 0x10000UL
#define NULL_OBJECT_HANDLE_BASE 0x20000000UL

#endif /* P11MUX_NULL_BACKEND_H */
