# SMTP-style server-first plaintext with STARTTLS, for the corpus test.
#   smtp.py server host port cert key keylog
#   smtp.py client host port ca keylog plain|starttls
# The server greets first ("220 ..."); after STARTTLS both sides switch to TLS and the client
# sends QUIT inside it.
import socket, ssl, sys

def lines(f):
    return f.readline().decode().strip()

if sys.argv[1] == "server":
    host, port, cert, key, keylog = sys.argv[2:7]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.keylog_filename = keylog
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(16)
    print("listening", port, flush=True)
    while True:
        c, _ = s.accept()
        # The session's socket: the plain one, then the TLS one after STARTTLS.
        conn = c
        try:
            c.sendall(b"220 corpus ESMTP\r\n")
            f = c.makefile("rb")
            while True:
                cmd = lines(f)
                if cmd.startswith("EHLO"):
                    c.sendall(b"250-corpus\r\n250 STARTTLS\r\n")
                elif cmd == "STARTTLS":
                    c.sendall(b"220 ready\r\n")
                    conn = ctx.wrap_socket(c, server_side=True)
                    if lines(conn.makefile("rb")) == "QUIT":
                        conn.sendall(b"221 tls bye\r\n")
                    break
                else:
                    c.sendall(b"221 bye\r\n")
                    break
        except Exception as e:
            print("session failed:", e, flush=True)
        finally:
            # makefile() keeps the descriptor open after close(): shut down to send the FIN now.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
else:
    host, port, ca, keylog, mode = sys.argv[2:7]
    with socket.create_connection((host, int(port)), timeout=5) as c:
        f = c.makefile("rb")
        assert lines(f).startswith("220")
        c.sendall(b"EHLO corpus\r\n")
        while not lines(f).startswith("250 "):
            pass
        if mode == "starttls":
            c.sendall(b"STARTTLS\r\n")
            assert lines(f).startswith("220")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(ca)
            ctx.check_hostname = False
            ctx.keylog_filename = keylog
            with ctx.wrap_socket(c) as t:
                t.sendall(b"QUIT\r\n")
                print(t.version(), t.makefile("rb").readline().decode().strip())
        else:
            c.sendall(b"QUIT\r\n")
            print("plain", lines(f))
