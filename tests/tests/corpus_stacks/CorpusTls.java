// TLS servers and a client of the corpus test (SunJSSE, javax.net.ssl).
//   java CorpusTls server cert key ca port:version:policy ...   (policy need|want|none)
//   java CorpusTls client host port version ca [cert key]
// Servers answer one request with whether they saw a client certificate; the client prints the
// negotiated protocol and the answer.
import java.io.*;
import java.net.*;
import java.nio.file.*;
import java.security.*;
import java.security.cert.*;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.*;
import javax.net.ssl.*;

public class CorpusTls {
    static byte[] pemBody(String path) throws IOException {
        String s = Files.readString(Path.of(path));
        s = s.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
        return Base64.getDecoder().decode(s);
    }

    static SSLContext context(String ca, String cert, String key) throws Exception {
        CertificateFactory cf = CertificateFactory.getInstance("X.509");
        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (InputStream in = new FileInputStream(ca)) {
            trust.setCertificateEntry("ca", cf.generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance("PKIX");
        tmf.init(trust);
        KeyManager[] kms = null;
        if (cert != null) {
            char[] pw = "corpus".toCharArray();
            KeyStore ks = KeyStore.getInstance("PKCS12");
            ks.load(null, null);
            Collection<? extends java.security.cert.Certificate> chain;
            try (InputStream in = new FileInputStream(cert)) {
                chain = cf.generateCertificates(in);
            }
            PrivateKey pk = KeyFactory.getInstance("EC")
                .generatePrivate(new PKCS8EncodedKeySpec(pemBody(key)));
            ks.setKeyEntry("key", pk, pw, chain.toArray(new java.security.cert.Certificate[0]));
            KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
            kmf.init(ks, pw);
            kms = kmf.getKeyManagers();
        }
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kms, tmf.getTrustManagers(), null);
        return ctx;
    }

    public static void main(String[] a) throws Exception {
        if (a[0].equals("server")) {
            SSLContext ctx = context(a[3], a[1], a[2]);
            for (int i = 4; i < a.length; i++) {
                String[] spec = a[i].split(":");
                SSLServerSocket ss = (SSLServerSocket) ctx.getServerSocketFactory()
                    .createServerSocket(Integer.parseInt(spec[0]), 16, InetAddress.getByName("0.0.0.0"));
                ss.setEnabledProtocols(new String[] {spec[1]});
                if (spec[2].equals("need")) ss.setNeedClientAuth(true);
                if (spec[2].equals("want")) ss.setWantClientAuth(true);
                Thread t = new Thread(() -> serve(ss));
                t.start();
                System.out.println("listening " + spec[0]);
            }
        } else {
            SSLContext ctx = context(a[4], a.length > 5 ? a[5] : null, a.length > 6 ? a[6] : null);
            try (SSLSocket s = (SSLSocket) ctx.getSocketFactory()
                    .createSocket(a[1], Integer.parseInt(a[2]))) {
                s.setEnabledProtocols(new String[] {a[3]});
                s.startHandshake();
                s.getOutputStream().write("GET / HTTP/1.0\r\nHost: corpus\r\n\r\n".getBytes());
                s.getOutputStream().flush();
                String body = new String(s.getInputStream().readAllBytes());
                System.out.println(s.getSession().getProtocol() + " " + body.replaceAll("\\r?\\n", " "));
            }
        }
    }

    static void serve(SSLServerSocket ss) {
        while (true) {
            try (SSLSocket s = (SSLSocket) ss.accept()) {
                BufferedReader r = new BufferedReader(new InputStreamReader(s.getInputStream()));
                String line;
                while ((line = r.readLine()) != null && !line.isEmpty()) {}
                boolean has;
                try {
                    has = s.getSession().getPeerCertificates().length > 0;
                } catch (SSLPeerUnverifiedException e) {
                    has = false;
                }
                s.getOutputStream().write(("HTTP/1.0 200 OK\r\n\r\nclient-cert=" + (has ? "yes" : "no") + "\n").getBytes());
                s.getOutputStream().flush();
            } catch (IOException e) {
                System.out.println("connection failed: " + e);
            }
        }
    }
}
