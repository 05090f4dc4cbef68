// One TLS connection of the corpus test (Node.js `tls`): argv host port version ca keylog
// [cert key]. Sends a request, prints the negotiated version and the server's answer.
const tls = require('tls');
const fs = require('fs');
const [host, port, version, ca, keylog, cert, key] = process.argv.slice(2);
const opts = {
  host, port: Number(port), ca: fs.readFileSync(ca), minVersion: version, maxVersion: version,
  checkServerIdentity: () => undefined,
};
if (cert) { opts.cert = fs.readFileSync(cert); opts.key = fs.readFileSync(key); }
const sock = tls.connect(opts, () => {
  sock.write('GET / HTTP/1.0\r\nHost: corpus\r\n\r\n');
});
sock.on('keylog', (line) => fs.appendFileSync(keylog, line));
let data = '';
sock.on('data', (d) => { data += d; });
sock.on('end', () => { console.log(sock.getProtocol() + ' ' + data.replace(/\r?\n/g, ' ')); });
sock.on('error', (e) => { console.error('error: ' + e.message); process.exit(1); });
