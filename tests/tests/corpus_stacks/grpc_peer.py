# gRPC peers of the corpus test (Python grpcio, BoringSSL), no generated code: one unary method
# on raw bytes that answers whether the server saw a client certificate.
#   grpc_peer.py server host mtls_port tls_port plain_port cert key ca
#   grpc_peer.py client target mtls|tls|plain ca [cert key]
import sys
from concurrent import futures

import grpc

METHOD = "/corpus.Echo/Call"


def raw(b):
    return b


def call(request, context):
    seen = bool(context.auth_context().get("x509_pem_cert"))
    return b"client-cert=" + (b"yes" if seen else b"no")


def read(path):
    with open(path, "rb") as f:
        return f.read()


if sys.argv[1] == "server":
    host, mtls_port, tls_port, plain_port, cert, key, ca = sys.argv[2:9]
    handler = grpc.method_handlers_generic_handler(
        "corpus.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(call, raw, raw)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    pair = [(read(key), read(cert))]
    server.add_secure_port(
        f"{host}:{mtls_port}",
        grpc.ssl_server_credentials(pair, root_certificates=read(ca), require_client_auth=True),
    )
    server.add_secure_port(f"{host}:{tls_port}", grpc.ssl_server_credentials(pair))
    server.add_insecure_port(f"{host}:{plain_port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()
else:
    target, mode, ca = sys.argv[2:5]
    options = [("grpc.enable_http_proxy", 0)]
    if mode == "plain":
        channel = grpc.insecure_channel(target, options=options)
    else:
        key = read(sys.argv[6]) if len(sys.argv) > 6 else None
        cert = read(sys.argv[5]) if len(sys.argv) > 5 else None
        creds = grpc.ssl_channel_credentials(read(ca), key, cert)
        channel = grpc.secure_channel(target, creds, options=options)
    with channel:
        stub = channel.unary_unary(METHOD, request_serializer=raw, response_deserializer=raw)
        print(mode, stub(b"ping", timeout=10).decode())
