// TLS servers of the corpus test (Node.js `tls`), one per listed port, all in one process.
// argv: cert key ca keylog then port:version:policy ... (version TLSv1.2|TLSv1.3,
// policy required|wanted|none). Each answers one request with whether it saw a client cert.
const tls = require('tls');
const fs = require('fs');
const [cert, key, ca, keylog, ...specs] = process.argv.slice(2);
for (const spec of specs) {
  const [port, version, policy] = spec.split(':');
  const server = tls.createServer({
    cert: fs.readFileSync(cert), key: fs.readFileSync(key), ca: fs.readFileSync(ca),
    minVersion: version, maxVersion: version,
    requestCert: policy !== 'none', rejectUnauthorized: policy === 'required',
  }, (sock) => {
    sock.once('data', () => {
      const peer = sock.getPeerCertificate();
      const has = peer && Object.keys(peer).length > 0;
      sock.end('HTTP/1.0 200 OK\r\n\r\nclient-cert=' + (has ? 'yes' : 'no') + '\n');
    });
    sock.on('error', () => {});
  });
  server.on('keylog', (line) => fs.appendFileSync(keylog, line));
  server.on('tlsClientError', () => {});
  server.listen(Number(port), '0.0.0.0', () => console.log('listening ' + port));
}
