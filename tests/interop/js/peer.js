// A js-libp2p peer that joins a CosmicSyncCore network, for tests/interop.rs.
//
//   node peer.js <bootstrap multiaddr ending in /p2p/<id>> <target peer id>
//                [--timeout SECS] [--kad-protocol NAME]
//
// It speaks what our node speaks and nothing else: TCP + TLS 1.3 (/tls/1.0.0) + yamux,
// identify, ping and Kademlia under /cosmicsync/kad/1.0.0 unless --kad-protocol says
// otherwise (server mode, so our nodes add it to their routing tables and can find it).
// It dials the bootstrap peer, identifies it, waits until its DHT has taken the peer in,
// pings it, and looks the target peer id up in the DHT through it, then prints ONE line
// of JSON with what it observed:
//
//   {"ok":true,"peer_id":…,"listen_addrs":[…],"identify":{"agent_version":…,"protocol_version":…,
//    "protocols":[…],"listen_addrs":[…]},"ping_rtt_ms":…,"lookup":{"target":…,"from":…,
//    "addrs":[…],"elapsed_ms":…}}
//
// and stays connected until its stdin closes or it gets SIGTERM/SIGINT, so the caller can
// look at it from the other side. On failure it prints {"ok":false,"step":…,"error":…}
// and a message on stderr, and exits 1; usage errors exit 2. Every step runs under one
// deadline (--timeout, default 60 s), and the wait after the report is bounded too.

import { parseArgs } from 'node:util'

// js-libp2p 2.x's dependencies call Promise.withResolvers (Node 22) in one place (the
// peer store's lock, mortice → it-queue); Node 20 lacks it. The same semantics, only
// where it is missing.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { tls } = await import('@libp2p/tls')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
const { peerIdFromString } = await import('@libp2p/peer-id')
const { multiaddr } = await import('@multiformats/multiaddr')

/** The Kademlia protocol of a CosmicSyncCore network (src/p2p/config.rs). */
const KAD_PROTOCOL = '/cosmicsync/kad/1.0.0'

/** How long the peer stays up after its report if nobody closes its stdin. */
const HOLD_LIMIT_MS = 10 * 60 * 1000

const usage = 'usage: node peer.js <bootstrap multiaddr with /p2p/<id>> <target peer id> [--timeout SECS] [--kad-protocol NAME]'

function fail (step, error, code = 1) {
  const message = error instanceof Error ? error.message : String(error)
  process.stdout.write(JSON.stringify({ ok: false, step, error: message }) + '\n')
  process.stderr.write(`interop peer: ${step} failed: ${message}\n`)
  process.exit(code)
}

let args
try {
  args = parseArgs({
    allowPositionals: true,
    options: {
      timeout: { type: 'string', default: '60' },
      'kad-protocol': { type: 'string', default: KAD_PROTOCOL }
    }
  })
} catch (e) {
  fail('arguments', `${e.message}\n${usage}`, 2)
}
if (args.positionals.length !== 2) {
  fail('arguments', usage, 2)
}
const kadProtocol = args.values['kad-protocol']
const timeoutSecs = Number(args.values.timeout)
if (!(timeoutSecs > 0)) {
  fail('arguments', `--timeout must be a positive number of seconds\n${usage}`, 2)
}

let bootstrap, bootstrapId, target
try {
  bootstrap = multiaddr(args.positionals[0])
  const id = bootstrap.getPeerId()
  if (id == null) {
    throw new Error(`${bootstrap} has no /p2p/<peer id>`)
  }
  bootstrapId = peerIdFromString(id)
  target = peerIdFromString(args.positionals[1])
} catch (e) {
  fail('arguments', `${e.message}\n${usage}`, 2)
}

// One deadline for everything up to the report: no step can hang the caller.
const deadline = AbortSignal.timeout(timeoutSecs * 1000)
let step = 'start'
const onDeadline = () => fail(step, `no answer within ${timeoutSecs} s`)
deadline.addEventListener('abort', onDeadline)

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  // The connection monitor pings every connection every 10 s on a stream of its own and
  // closes the connection if that ping fails. rust-libp2p answers one inbound ping stream
  // per connection and drops the older one when another arrives (the ping spec lets a
  // dialer keep only one), so a monitor ping that overlaps kad-dht's or ours would be
  // reset and the connection torn down at random. Off, so every run behaves the same.
  connectionMonitor: { enabled: false },
  transports: [tcp()],
  connectionEncrypters: [tls()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    dht: kadDHT({
      protocol: kadProtocol,
      // Answer queries: on loopback nothing would ever confirm a public address.
      clientMode: false,
      // Loopback addresses are the only ones in the test; the default mapper drops them.
      peerInfoMapper: passthroughMapper
    })
  }
}).catch(e => fail(step, e))

/** Resolves once the DHT has `peerId` in its routing table. */
async function inRoutingTable (peerId) {
  const table = node.services.dht.routingTable
  const added = new Promise(resolve => {
    const onAdd = (event) => {
      if (event.detail.equals(peerId)) {
        table.removeEventListener('peer:add', onAdd)
        resolve()
      }
    }
    table.addEventListener('peer:add', onAdd)
  })
  if (await table.find(peerId) == null) {
    await added
  }
}

async function shutdown (code) {
  await node.stop().catch(() => {})
  process.exit(code)
}

try {
  step = 'dial'
  const connection = await node.dial(bootstrap, { signal: deadline })

  step = 'identify'
  const info = await node.services.identify.identify(connection, { signal: deadline })
  if (!info.peerId.equals(bootstrapId)) {
    throw new Error(`identified as ${info.peerId}, dialled ${bootstrapId}`)
  }
  if (!info.protocols.includes(kadProtocol)) {
    throw new Error(`the bootstrap peer does not speak ${kadProtocol}; it speaks ${info.protocols.join(', ')}`)
  }

  // kad-dht adds a peer to its routing table only after pinging it over /ipfs/ping/1.0.0,
  // and a failed check keeps the peer out for good. Our own ping must not overlap that
  // check (see connectionMonitor above), so it waits for it.
  step = 'dht routing table'
  await inRoutingTable(bootstrapId)

  step = 'ping'
  const rtt = await node.services.ping.ping(bootstrapId, { signal: deadline })

  // Through the network only (not the local peer store), so the answer comes from a
  // peer; the report says which.
  step = 'dht lookup'
  const started = performance.now()
  let found
  for await (const event of node.services.dht.findPeer(target, { signal: deadline, useCache: false })) {
    if (event.name === 'FINAL_PEER') {
      found = event
      break
    }
  }
  if (found == null) {
    throw new Error(`peer ${target} not found in the DHT`)
  }

  const report = {
    ok: true,
    peer_id: node.peerId.toString(),
    agent_version: node.services.identify.host?.agentVersion ?? null,
    listen_addrs: node.getMultiaddrs().map(String),
    identify: {
      peer_id: info.peerId.toString(),
      agent_version: info.agentVersion ?? null,
      protocol_version: info.protocolVersion ?? null,
      protocols: info.protocols,
      listen_addrs: info.listenAddrs.map(String)
    },
    ping_rtt_ms: rtt,
    lookup: {
      target: target.toString(),
      from: found.from.toString(),
      addrs: found.peer.multiaddrs.map(String),
      elapsed_ms: performance.now() - started
    }
  }
  deadline.removeEventListener('abort', onDeadline)
  process.stdout.write(JSON.stringify(report) + '\n')
} catch (e) {
  fail(step, e)
}

// Stay connected until the caller is done (stdin closes) or a signal, within a bound.
step = 'hold'
const hold = setTimeout(() => {
  process.stderr.write('interop peer: nobody closed stdin; stopping\n')
  shutdown(0)
}, HOLD_LIMIT_MS)
const stop = () => { clearTimeout(hold); shutdown(0) }
process.stdin.on('end', stop)
process.stdin.on('error', stop)
process.stdin.resume()
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
