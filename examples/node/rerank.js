#!/usr/bin/env node
// Rank documents (texts and image files) against a query with a lychee.rerank.v1 server.
//
// Built only from the contract (proto/lychee/rerank/v1/rerank.proto) with @grpc/grpc-js and
// @grpc/proto-loader: no generated code. Run `node rerank.js --help` for the options.
"use strict";

const fs = require("fs");
const path = require("path");
const { parseArgs } = require("util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const USAGE = `usage: node rerank.js --target HOST:PORT --query TEXT [options] [DOCUMENT_TEXT ...]

Ranks the documents (each DOCUMENT_TEXT argument, and each --image FILE) by relevance to the
query and prints them best first.

  --target HOST:PORT     the server (default: $LYCHEE_TARGET or localhost:50051)
  --query TEXT           query text; --query-image FILE adds (or is) an image query
  --image FILE           an image document (JPEG, PNG or WebP); repeatable
  --instruction TEXT     task instruction (default: the server's web-search instruction)
  --top-n N              print only the best N
  --json                 print the response as JSON
  --timeout SECONDS      deadline of the call (default 30)
  --api-key TOKEN        bearer token (default: $LYCHEE_API_KEY); prefer the variable, a flag
                         is visible to other users in the process list
  --tls-ca FILE          PEM CA to trust: use TLS (without it, plaintext unless --tls)
  --tls                  use TLS with the system's trusted CAs
  --tls-cert FILE        client certificate (PEM) for mutual TLS; needs --tls-key
  --tls-key FILE         client private key (PEM) for mutual TLS
  --server-name NAME     TLS name to verify instead of the target's host
  --proto-root DIR       directory holding lychee/rerank/v1/rerank.proto
                         (default: $LYCHEE_PROTO_ROOT or this repository's proto/)

Exit status: 0 ranked, 1 the call failed, 2 bad arguments.`;

const MEDIA_TYPES = [
  { name: "MEDIA_TYPE_JPEG", test: (b) => b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff },
  { name: "MEDIA_TYPE_PNG", test: (b) => b.subarray(0, 8).equals(Buffer.from("89504e470d0a1a0a", "hex")) },
  {
    name: "MEDIA_TYPE_WEBP",
    test: (b) => b.subarray(0, 4).toString("latin1") === "RIFF" && b.subarray(8, 12).toString("latin1") === "WEBP",
  },
];

class UsageError extends Error {}

// grpc-js sends the target's host as the TLS server name (SNI) even when it is an IP address,
// which Node reports once as DEP0123 on stderr. Certificates for IP addresses are ordinary on
// private networks, so that one notice is dropped; every other warning is printed as usual.
const emitWarning = process.emitWarning;
process.emitWarning = function (warning, ...rest) {
  const code = typeof rest[0] === "object" && rest[0] !== null ? rest[0].code : rest[1];
  if (code === "DEP0123") return;
  return emitWarning.call(process, warning, ...rest);
};

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: "string" },
      query: { type: "string" },
      "query-image": { type: "string" },
      image: { type: "string", multiple: true },
      instruction: { type: "string" },
      "top-n": { type: "string" },
      json: { type: "boolean" },
      timeout: { type: "string" },
      "api-key": { type: "string" },
      tls: { type: "boolean" },
      "tls-ca": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "server-name": { type: "string" },
      "proto-root": { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  return { values, positionals };
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new UsageError(`cannot read ${what} ${JSON.stringify(file)}: ${err.code || err.message}`);
  }
}

function image(file, what) {
  const data = readFile(file, what);
  const kind = MEDIA_TYPES.find((m) => m.test(data));
  if (!kind) throw new UsageError(`${file}: not a JPEG, PNG or WebP image (convert it first)`);
  return { data, media_type: kind.name };
}

function content(text, img) {
  if (text && img) return { text_image: { text, image: img } };
  if (img) return { image: img };
  return { text };
}

function loadService(protoRoot) {
  const file = path.join(protoRoot, "lychee", "rerank", "v1", "rerank.proto");
  if (!fs.existsSync(file)) {
    throw new UsageError(`${file} not found: pass --proto-root DIR (the directory holding lychee/rerank/v1/)`);
  }
  const definition = protoLoader.loadSync("lychee/rerank/v1/rerank.proto", {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).lychee.rerank.v1.RerankService;
}

function credentials(opts) {
  const ca = opts["tls-ca"] ? readFile(opts["tls-ca"], "--tls-ca") : null;
  if (Boolean(opts["tls-cert"]) !== Boolean(opts["tls-key"])) {
    throw new UsageError("--tls-cert and --tls-key go together (mutual TLS)");
  }
  const useTls = Boolean(opts.tls || ca || opts["tls-cert"]);
  if (!useTls) {
    if (opts["server-name"]) throw new UsageError("--server-name needs TLS (--tls-ca or --tls)");
    return grpc.credentials.createInsecure();
  }
  const key = opts["tls-key"] ? readFile(opts["tls-key"], "--tls-key") : null;
  const cert = opts["tls-cert"] ? readFile(opts["tls-cert"], "--tls-cert") : null;
  return grpc.credentials.createSsl(ca, key, cert);
}

function callMetadata(apiKey) {
  const metadata = new grpc.Metadata();
  if (apiKey !== undefined && apiKey !== "") {
    // gRPC metadata values are printable ASCII; say so instead of failing obscurely.
    if (!/^[\x20-\x7e]+$/.test(apiKey)) throw new UsageError("the API key must be printable ASCII");
    metadata.set("authorization", `Bearer ${apiKey}`);
  }
  return metadata;
}

function positiveNumber(value, flag, integer) {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0 || (integer && !Number.isInteger(n))) {
    throw new UsageError(`${flag} must be a positive ${integer ? "integer" : "number"}, got ${JSON.stringify(value)}`);
  }
  return n;
}

function buildRequest(opts, positionals) {
  const queryImage = opts["query-image"] ? image(opts["query-image"], "--query-image") : null;
  if (!opts.query && !queryImage) throw new UsageError("give --query and/or --query-image");
  const documents = [
    ...positionals.map((text, i) => ({ id: `text:${i}`, content: { text }, label: text })),
    ...(opts.image || []).map((file) => ({ id: `image:${file}`, content: { image: image(file, "--image") }, label: file })),
  ];
  if (documents.length === 0) throw new UsageError("give at least one document (text arguments and/or --image FILE)");
  const options = {};
  if (opts["top-n"] !== undefined) options.top_n = positiveNumber(opts["top-n"], "--top-n", true);
  const request = {
    query: content(opts.query, queryImage),
    documents: documents.map(({ id, content: c }) => ({ id, content: c })),
    options,
  };
  if (opts.instruction !== undefined) request.instruction = opts.instruction;
  return { request, labels: documents.map((d) => d.label) };
}

function describeError(err, target) {
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
  if (err.code === grpc.status.UNAVAILABLE && !err.metadata?.get("grpc-status-details-bin").length) {
    // Not an answer from the service (which always sends details): nothing reachable there.
    return `server at ${target} is unreachable (${code}): ${String(err.details).trim()}`;
  }
  return `${code}: ${String(err.details).trim()}`;
}

function rerank(client, request, metadata, seconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + seconds * 1000);
    client.Rerank(request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main(argv) {
  let parsed;
  try {
    parsed = parse(argv);
  } catch (err) {
    throw new UsageError(err.message);
  }
  const { values: opts, positionals } = parsed;
  if (opts.help) {
    process.stdout.write(USAGE + "\n");
    return 0;
  }
  const target = opts.target || process.env.LYCHEE_TARGET || "localhost:50051";
  const timeout = opts.timeout !== undefined ? positiveNumber(opts.timeout, "--timeout", false) : 30;
  const protoRoot = path.resolve(
    opts["proto-root"] || process.env.LYCHEE_PROTO_ROOT || path.join(__dirname, "..", "..", "proto"),
  );
  const metadata = callMetadata(opts["api-key"] ?? process.env.LYCHEE_API_KEY);
  const { request, labels } = buildRequest(opts, positionals);
  const Service = loadService(protoRoot);
  const channelOptions = opts["server-name"] ? { "grpc.ssl_target_name_override": opts["server-name"] } : {};
  const client = new Service(target, credentials(opts), channelOptions);
  let response;
  try {
    response = await rerank(client, request, metadata, timeout);
  } catch (err) {
    console.error(`rerank.js: ${describeError(err, target)}`);
    return 1;
  } finally {
    client.close();
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify(response) + "\n");
    return 0;
  }
  for (const [rank, r] of response.results.entries()) {
    const label = labels[r.index].length > 70 ? labels[r.index].slice(0, 69) + "…" : labels[r.index];
    process.stdout.write(`${String(rank + 1).padStart(3)}  ${r.score.toFixed(4)}  ${label}\n`);
  }
  return 0;
}

main(process.argv.slice(2))
  .then((code) => {
    process.exitCode = code;
  })
  .catch((err) => {
    if (err instanceof UsageError) {
      console.error(`rerank.js: ${err.message}\n(run with --help for the options)`);
      process.exitCode = 2;
    } else {
      console.error(`rerank.js: ${err && err.stack ? err.stack : err}`);
      process.exitCode = 1;
    }
  });
