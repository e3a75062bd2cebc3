// An independent HBONE client: Node.js's built-in http2 module (nghttp2 underneath).
//
// Usage: node h2_connect_client.js <config.json>
// config: {host, port, cert, key, ca, expectedSan, streams: [{authority, size, seed}], extraHeaders}
// Opens ONE TLS 1.3 + h2 connection with the workload certificate, checks the server's URI SAN,
// then runs every stream concurrently: CONNECT, send `size` bytes, half-close, read the echo.
// Prints one JSON line: {alpn, tlsVersion, cipher, results: [{status, sent, received, sentSha, recvSha}]}.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const http2 = require('http2');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function payload(size, seed) {
  const out = Buffer.alloc(size);
  let off = 0;
  let counter = 0;
  while (off < size) {
    const block = crypto.createHash('sha256').update(`${seed}:${counter}`).digest();
    off += block.copy(out, off);
    counter += 1;
  }
  return out;
}

const session = http2.connect(`https://${cfg.host}:${cfg.port}`, {
  ca: fs.readFileSync(cfg.ca),
  cert: fs.readFileSync(cfg.cert),
  key: fs.readFileSync(cfg.key),
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  // HBONE servers are addressed by IP and identified by their SPIFFE URI SAN, not by a host name.
  checkServerIdentity: (_host, cert) => {
    const sans = (cert.subjectaltname || '').split(', ');
    if (!sans.includes(`URI:${cfg.expectedSan}`)) {
      return new Error(`server SAN ${cert.subjectaltname} is not ${cfg.expectedSan}`);
    }
    return undefined;
  },
});

const timer = setTimeout(() => {
  console.error('timed out');
  process.exit(3);
}, 60000);

session.on('error', (err) => {
  console.log(JSON.stringify({ error: String(err) }));
  clearTimeout(timer);
  process.exit(0);
});

session.on('connect', () => {
  const sock = session.socket;
  const info = { alpn: sock.alpnProtocol, tlsVersion: sock.getProtocol(), cipher: sock.getCipher().standardName };
  const runs = cfg.streams.map((s) => new Promise((resolve) => {
    const headers = { ':method': 'CONNECT', ':authority': s.authority, ...(cfg.extraHeaders || {}) };
    const req = session.request(headers);
    const data = payload(s.size, s.seed);
    const hash = crypto.createHash('sha256');
    let received = 0;
    let status = null;
    req.on('response', (h) => {
      status = h[':status'];
      if (status !== 200) {
        return;
      }
      // Write in chunks to exercise flow control both ways.
      let off = 0;
      const step = 300 * 1024;
      const pump = () => {
        while (off < data.length) {
          const chunk = data.subarray(off, Math.min(off + step, data.length));
          off += chunk.length;
          if (!req.write(chunk)) {
            req.once('drain', pump);
            return;
          }
        }
        req.end();
      };
      pump();
    });
    req.on('data', (chunk) => {
      received += chunk.length;
      hash.update(chunk);
    });
    const done = (error) => resolve({
      status,
      sent: status === 200 ? data.length : 0,
      received,
      sentSha: crypto.createHash('sha256').update(data).digest('hex'),
      recvSha: hash.digest('hex'),
      ...(error ? { error: String(error) } : {}),
    });
    req.on('end', () => done());
    req.on('error', (err) => done(err));
  }));
  Promise.all(runs).then((results) => {
    console.log(JSON.stringify({ ...info, results }));
    clearTimeout(timer);
    session.close(() => process.exit(0));
  });
});
