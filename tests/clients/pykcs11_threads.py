#!/usr/bin/python3
"""PyKCS11 with 16 threads on one session (tests/clients/pykcs11-threads.sh).

Logs in, makes an EC P-256 key pair on the token and an RSA-2048 key pair as
session objects, then:
  1. one signature with each key, its verification, and a wrong message's
     rejection (CKR_SIGNATURE_INVALID);
  2. two threads interleaved on the one session, in a fixed order: A's
     C_SignInit, then B's C_SignInit, then both C_Sign. With one operation per
     session (SoftHSM2 directly, p11mux serialize) B gets
     CKR_OPERATION_ACTIVE; with operation state per thread (p11mux multiplex)
     both sign. --expect names which of the two the caller expects;
  3. THREADS threads share the session with an application lock around each
     sign and verify (what the spec asks of an application that shares one
     session): every attempt signs and verifies, in every mode;
  4. THREADS threads share the session with no lock. Per thread: every
     attempt signs. Per session: every attempt signs or gets
     CKR_OPERATION_ACTIVE (never another error, never a bad signature). Each
     signature is verified afterwards against its own message.

Prints only what is deterministic; counts that vary from run to run and
timings go to the --info file. Exit 0 when everything is as expected.

PyKCS11 1.5.12 keeps the GIL across each PKCS#11 call (its extension calls no
PyEval_SaveThread), so these calls never overlap in time: they interleave
between calls, as often as the switch interval set below lets them.
"""
import argparse
import hashlib
import sys
import threading
import time

import PyKCS11
from PyKCS11 import (CKA_CLASS, CKA_EC_PARAMS, CKA_LABEL, CKA_MODULUS_BITS,
                     CKA_PRIVATE, CKA_PUBLIC_EXPONENT, CKA_SENSITIVE,
                     CKA_SIGN, CKA_TOKEN, CKA_VERIFY, CKF_RW_SESSION,
                     CKF_SERIAL_SESSION, CKM_ECDSA,
                     CKM_SHA256_RSA_PKCS, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY,
                     CKR_OK, CKR_OPERATION_ACTIVE, CKR_SIGNATURE_INVALID,
                     CKR, Mechanism, MechanismECGENERATEKEYPAIR,
                     MechanismRSAGENERATEKEYPAIR, PyKCS11Error, PyKCS11Lib,
                     ckbytelist)

P256 = bytes.fromhex("06082a8648ce3d030107")  # DER OID prime256v1

parser = argparse.ArgumentParser()
parser.add_argument("--module", required=True)
parser.add_argument("--label", required=True)
parser.add_argument("--pin", required=True)
parser.add_argument("--threads", type=int, default=16)
parser.add_argument("--count", type=int, default=40, help="attempts per thread and phase")
parser.add_argument("--seconds", type=float, default=20, help="time bound per phase")
parser.add_argument("--expect", choices=("one-operation", "per-thread"), required=True,
                    help="one-operation: one operation per session (the spec); "
                    "per-thread: operation state per thread (p11mux multiplex)")
parser.add_argument("--info", required=True, help="file for counts that vary and timings")
args = parser.parse_args()

# Switch threads often, so that threads' calls interleave (default 5 ms).
sys.setswitchinterval(1e-5)

info = open(args.info, "w")
failed = False


def fail(text):
    global failed
    failed = True
    print("FAIL: " + text)


def name(rv):
    return CKR.get(rv, hex(rv))


lib = PyKCS11Lib()
lib.load(args.module)
slots = [s for s in lib.getSlotList(tokenPresent=True)
         if lib.getTokenInfo(s).label.strip() == args.label]
if len(slots) != 1:
    print("FAIL: %d tokens labelled %s" % (len(slots), args.label))
    sys.exit(1)
session = lib.openSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION)
session.login(args.pin)
print("logged in")

ec_pub, ec_priv = session.generateKeyPair(
    [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_TOKEN, True), (CKA_VERIFY, True),
     (CKA_EC_PARAMS, P256), (CKA_LABEL, "ec")],
    [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_TOKEN, True), (CKA_PRIVATE, True),
     (CKA_SENSITIVE, True), (CKA_SIGN, True), (CKA_LABEL, "ec")],
    MechanismECGENERATEKEYPAIR)
rsa_pub, rsa_priv = session.generateKeyPair(
    [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_TOKEN, False), (CKA_VERIFY, True),
     (CKA_MODULUS_BITS, 2048), (CKA_PUBLIC_EXPONENT, (1, 0, 1)), (CKA_LABEL, "rsa")],
    [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_TOKEN, False), (CKA_PRIVATE, True),
     (CKA_SENSITIVE, True), (CKA_SIGN, True), (CKA_LABEL, "rsa")],
    MechanismRSAGENERATEKEYPAIR)
# (name, private key, public key, mechanism); attempt i uses KEYS[i % 2].
# SoftHSM2 2.6 has no CKM_ECDSA_SHA256: EC signs the message's SHA-256 (see
# tbs()) with CKM_ECDSA.
KEYS = [("EC P-256 token key, CKM_ECDSA", ec_priv, ec_pub, Mechanism(CKM_ECDSA)),
        ("RSA-2048 session key, CKM_SHA256_RSA_PKCS", rsa_priv, rsa_pub,
         Mechanism(CKM_SHA256_RSA_PKCS))]
print("generated an EC P-256 key pair on the token and an RSA-2048 key pair in the session")



def tbs(k, msg):
    """What key k signs for msg."""
    return hashlib.sha256(msg).digest() if k == 0 else msg


# 1. One thread.
for k, (kname, priv, pub, mech) in enumerate(KEYS):
    sig = bytes(session.sign(priv, tbs(k, b"one thread"), mech))
    good = session.verify(pub, tbs(k, b"one thread"), sig, mech)
    bad = session.verify(pub, tbs(k, b"another message"), sig, mech)
    print("%s: signature verifies: %s, another message's rejected: %s"
          % (kname, good, not bad))
    if not good or bad:
        fail("single-threaded signature check")

# 2. Two threads interleaved in a fixed order on the one session.
_, priv, pub, mech = KEYS[0]
a_inited, b_inited = threading.Event(), threading.Event()
result = {}


def raw_sign(data):
    """The rest of Session.sign after C_SignInit: length query, then sign."""
    sig, data1 = ckbytelist(), ckbytelist(data)
    for _ in range(2):
        rv = session.lib.C_Sign(session.session, data1, sig)
        if rv != CKR_OK:
            return rv, None
    return CKR_OK, bytes(sig)


def interleave(who, first_wait, then_set):
    if first_wait is not None and not first_wait.wait(10):
        result[who] = ("no turn", None)
        return
    rv = session.lib.C_SignInit(session.session, mech.to_native(), priv)
    result[who + " init"] = rv
    then_set.set()
    if who == "A" and not b_inited.wait(10):
        result[who] = ("no turn", None)
        return
    result[who] = raw_sign(tbs(0, ("thread " + who).encode())) if rv == CKR_OK else (rv, None)


ta = threading.Thread(target=interleave, args=("A", None, a_inited))
tb = threading.Thread(target=interleave, args=("B", a_inited, b_inited))
ta.start(), tb.start()
ta.join(30), tb.join(30)
info.write("interleaved: %s\n" % {k: (name(v) if isinstance(v, int) else
                                       (name(v[0]) if isinstance(v[0], int) else v[0]))
                                   for k, v in result.items()})
ok = {}
for who in "AB":
    rv, sig = result.get(who, ("missing", None))
    ok[who] = sig is not None and session.verify(pub, tbs(0, ("thread " + who).encode()), sig, mech)
if args.expect == "one-operation":
    want = ok["A"] and result.get("B init") == CKR_OPERATION_ACTIVE
else:
    want = ok["A"] and ok["B"]
if want:
    print("two threads interleaved on the session (A init, B init, A and B sign): "
          "as this mode specifies")
else:
    fail("two threads interleaved on the session, expected %s: A %s, B init %s, B %s"
         % (args.expect, ok["A"], name(result.get("B init", -1)), ok["B"]))


# 3 and 4. THREADS threads, COUNT attempts each, on the one session.
def run_phase(title, lock):
    deadline = time.monotonic() + args.seconds
    signed = []          # (key index, message, signature)
    errors = {}          # CKR name -> count
    attempts = [0]
    guard = threading.Lock()  # for the lists above, never around a PKCS#11 call

    def worker(t):
        for i in range(args.count):
            if time.monotonic() > deadline:
                return
            k = i % 2
            _, priv, pub, mech = KEYS[k]
            msg = ("%s: thread %d message %d" % (title, t, i)).encode()
            try:
                if lock is not None:
                    with lock:
                        sig = bytes(session.sign(priv, tbs(k, msg), mech))
                else:
                    sig = bytes(session.sign(priv, tbs(k, msg), mech))
                with guard:
                    signed.append((k, msg, sig))
            except PyKCS11Error as e:
                with guard:
                    errors[name(e.value)] = errors.get(name(e.value), 0) + 1
            with guard:
                attempts[0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(args.seconds + 10)
    elapsed = time.monotonic() - start
    if any(th.is_alive() for th in threads):
        fail("%s: a thread did not finish" % title)
        return
    # Each signature against its own message (and so its own thread's), one
    # thread now.
    bad = sum(1 for k, msg, sig in signed
              if not session.verify(KEYS[k][2], tbs(k, msg), sig, KEYS[k][3]))
    info.write("%s: %d attempts, %d signed, %d bad, errors %s, %.2f s\n"
               % (title, attempts[0], len(signed), bad, errors, elapsed))
    return attempts[0], len(signed), bad, errors


total = args.threads * args.count
res = run_phase("application lock", threading.Lock())
if res is not None:
    n, signed, bad, errors = res
    if (n, signed, bad, errors) == (total, total, 0, {}):
        print("%d threads x %d with an application lock on one session: %d signed and verified"
              % (args.threads, args.count, total))
    else:
        fail("application lock: %d of %d attempts, %d signed, %d bad, errors %s"
             % (n, total, signed, bad, errors))

res = run_phase("no lock", None)
if res is not None:
    n, signed, bad, errors = res
    if args.expect == "one-operation":
        allowed = set(errors) <= {name(CKR_OPERATION_ACTIVE)}
    else:
        allowed = not errors and signed == total
    if n == total and bad == 0 and allowed:
        print("%d threads x %d with no lock on one session: as this mode specifies, "
              "every signature verifies" % (args.threads, args.count))
    else:
        fail("no lock, expected %s: %d of %d attempts, %d signed, %d bad, errors %s"
             % (args.expect, n, total, signed, bad, errors))

session.logout()
session.closeSession()
print("logged out, closed")
info.close()
sys.exit(1 if failed else 0)
