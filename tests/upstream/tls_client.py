"""One kept-alive HTTPS connection to kvgate, driven line by line from the test.

Usage: tls_client.py PORT CA_FILE. Opens one TLS connection (verifying kvgate's certificate
against CA_FILE) and, for every line read on stdin, sends `GET /v1/models` on that same
connection and prints a JSON line: the status, the certificate's common name as negotiated
on this connection, and the client's local port (which changes if the connection was
replaced). Exits at end of input.
"""

import http.client
import json
import ssl
import sys


def common_name(cert):
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def main():
    port, ca_file = int(sys.argv[1]), sys.argv[2]
    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    conn.connect()
    # http.client would silently reconnect after a dropped connection: it must not be dropped.
    sock = conn.sock
    for _ in sys.stdin:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        response.read()
        print(
            json.dumps(
                {
                    "status": response.status,
                    "cn": common_name(conn.sock.getpeercert()),
                    "local_port": conn.sock.getsockname()[1],
                    "same_socket": conn.sock is sock,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
