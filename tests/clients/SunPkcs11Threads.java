// Java SunPKCS11 with 32 signing threads (tests/clients/sunpkcs11-threads.sh).
//
//   java SunPkcs11Threads CONFIG PIN THREADS COUNT SECONDS INFO
//
// Logs in through the PKCS11 KeyStore, generates an EC P-256 and an RSA-2048
// key pair on the token with the provider's KeyPairGenerator (session objects,
// as SunPKCS11 makes them), then THREADS threads each sign COUNT messages of
// their own (attempt i with the EC key and SHA256withECDSA when i is even, the
// RSA key and SHA256withRSA when odd) through the provider, and each signature
// is verified against its own message with the public key through Java's own
// providers (SunEC, SunRsaSign). SunPKCS11 keeps its own pool of sessions, so
// the threads sign on several sessions at once, in parallel: Java holds no
// lock across a PKCS#11 call (a trace through p11mux showed up to 31 calls in
// flight at once).
//
// Prints only what is deterministic; timings go to the INFO file. Exit 0
// when every attempt signed and verified.
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.Provider;
import java.security.PublicKey;
import java.security.Security;
import java.security.Signature;
import java.security.spec.ECGenParameterSpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

public class SunPkcs11Threads {
  static final String[] SIGNATURES = {"SHA256withECDSA", "SHA256withRSA"};
  static final String[] VERIFIERS = {"SunEC", "SunRsaSign"};

  public static void main(String[] args) throws Exception {
    String config = args[0];
    char[] pin = args[1].toCharArray();
    int threads = Integer.parseInt(args[2]);
    int count = Integer.parseInt(args[3]);
    long deadline = System.nanoTime() + (long) (Double.parseDouble(args[4]) * 1e9);
    Path info = Path.of(args[5]);

    Provider p = Security.getProvider("SunPKCS11").configure(config);
    Security.addProvider(p);
    KeyStore ks = KeyStore.getInstance("PKCS11", p);
    ks.load(null, pin);
    System.out.println("provider " + p.getName() + ": logged in");

    KeyPairGenerator ecGen = KeyPairGenerator.getInstance("EC", p);
    ecGen.initialize(new ECGenParameterSpec("secp256r1"));
    KeyPairGenerator rsaGen = KeyPairGenerator.getInstance("RSA", p);
    rsaGen.initialize(2048);
    KeyPair[] pairs = {ecGen.generateKeyPair(), rsaGen.generateKeyPair()};
    // The public keys as Java's own providers see them: verification does not
    // go through the token.
    PublicKey[] publics = {
      KeyFactory.getInstance("EC", VERIFIERS[0])
          .generatePublic(new X509EncodedKeySpec(pairs[0].getPublic().getEncoded())),
      KeyFactory.getInstance("RSA", VERIFIERS[1])
          .generatePublic(new X509EncodedKeySpec(pairs[1].getPublic().getEncoded()))};
    System.out.println("generated with " + p.getName() + ": EC P-256 ("
        + pairs[0].getPrivate().getClass().getSimpleName() + ") and RSA-2048 ("
        + pairs[1].getPrivate().getClass().getSimpleName() + ")");

    // One thread first: a signature verifies, and not for another message.
    for (int k = 0; k < 2; k++) {
      byte[] sig = sign(p, pairs[k], k, "one thread");
      System.out.println(SIGNATURES[k] + ": signature verifies: "
          + verify(publics[k], k, "one thread", sig) + ", another message's rejected: "
          + !verify(publics[k], k, "another message", sig));
    }

    AtomicInteger attempts = new AtomicInteger();
    AtomicInteger signed = new AtomicInteger();
    AtomicInteger verified = new AtomicInteger();
    Map<String, Integer> errors = new ConcurrentHashMap<>();
    ExecutorService pool = Executors.newFixedThreadPool(threads);
    long start = System.nanoTime();
    for (int t = 0; t < threads; t++) {
      final int thread = t;
      pool.submit(() -> {
        for (int i = 0; i < count && System.nanoTime() < deadline; i++) {
          attempts.incrementAndGet();
          int k = i % 2;
          String msg = "thread " + thread + " message " + i;
          try {
            byte[] sig = sign(p, pairs[k], k, msg);
            signed.incrementAndGet();
            if (verify(publics[k], k, msg, sig)) {
              verified.incrementAndGet();
            }
          } catch (Exception e) {
            errors.merge(e.getClass().getSimpleName() + ": " + e.getMessage(), 1, Integer::sum);
          }
        }
      });
    }
    pool.shutdown();
    boolean finished = pool.awaitTermination((deadline - System.nanoTime()) / 1000000 + 10000,
        TimeUnit.MILLISECONDS);
    double seconds = (System.nanoTime() - start) / 1e9;
    Files.writeString(info, String.format(
        "%d threads: %d attempts, %d signed, %d verified in %.2f s%n",
        threads, attempts.get(), signed.get(), verified.get(), seconds));
    int total = threads * count;
    System.out.println(threads + " threads x " + count + " signing in parallel: "
        + (finished ? "all finished" : "NOT all finished") + ", " + attempts.get() + " attempts, "
        + signed.get() + " signed, " + verified.get() + " verified");
    new TreeMap<>(errors).forEach((e, n) -> System.out.println("error (" + n + "x): " + e));
    boolean ok = finished && attempts.get() == total && signed.get() == total
        && verified.get() == total && errors.isEmpty();
    System.out.println(ok ? "OK" : "FAIL");
    System.exit(ok ? 0 : 1);
  }

  static byte[] sign(Provider p, KeyPair pair, int k, String msg) throws Exception {
    Signature s = Signature.getInstance(SIGNATURES[k], p);
    s.initSign(pair.getPrivate());
    s.update(msg.getBytes(StandardCharsets.UTF_8));
    return s.sign();
  }

  static boolean verify(PublicKey pub, int k, String msg, byte[] sig) throws Exception {
    Signature v = Signature.getInstance(SIGNATURES[k], VERIFIERS[k]);
    v.initVerify(pub);
    v.update(msg.getBytes(StandardCharsets.UTF_8));
    return v.verify(sig);
  }
}
