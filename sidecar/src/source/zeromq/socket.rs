//! The socket thread: libzmq sockets block and must not be used from two
//! threads at once, so one thread of its own owns the bound socket (and,
//! with CURVE, the ZAP handler that checks each client's key) and the
//! runtime talks to it through channels. Received requests go to the
//! runtime over a tokio channel; replies and settlements come back over an
//! inproc socket, which wakes the thread's `zmq_poll` like any socket.
//!
//! The thread counts what it handed over and what came back settled, and
//! reads the bound socket only while fewer than `maxInFlight` are
//! unsettled; what is not read waits in libzmq's queue (up to its high-water
//! mark, then in TCP), so a slow application slows the peers down.

use std::collections::HashSet;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::wire::{self, Frames};
use super::CurveKeys;
use crate::config::ZeroMqPattern;

/// libzmq asks the handler bound here whether a CURVE client may connect
/// (ZAP, RFC 27); without a handler, libzmq 4.3 accepts any client key.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain of the bound socket.
const ZAP_DOMAIN: &str = "idemq";
/// How long closing the bound socket waits for replies still queued.
const LINGER_MS: i32 = 1000;

/// Control messages from the runtime, in the first frame.
const REPLY: &[u8] = b"R";
const SETTLED: &[u8] = b"S";
const STOP: &[u8] = b"X";

pub struct Options {
    pub pattern: ZeroMqPattern,
    /// The endpoint to bind, `$(POD_IP)` resolved.
    pub endpoint: String,
    pub subscribe: Vec<String>,
    pub max_in_flight: usize,
    pub curve: Option<CurveKeys>,
}

/// One request, as read from the bound socket.
#[derive(Debug)]
pub struct Received {
    /// The route of its reply (`router` only).
    pub route: Frames,
    pub frames: Frames,
}

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SocketError {
    pub what: String,
    pub source: zmq::Error,
}

/// Sends `frames` as one multipart message, always as borrowed slices, which
/// libzmq copies. The `zmq` crate (0.9) hands an owned buffer (`Vec<u8>`, or
/// `&Vec<u8>`, which it clones) to libzmq without copying and frees it later
/// as a one-byte allocation: undefined behaviour that corrupts the heap under
/// a size-aware allocator such as the sidecar's jemalloc. Every send goes
/// through here.
pub fn send_frames(socket: &zmq::Socket, frames: &[Vec<u8>], flags: i32) -> zmq::Result<()> {
    socket.send_multipart(frames.iter().map(Vec::as_slice), flags)
}

fn context(what: impl Into<String>) -> impl FnOnce(zmq::Error) -> SocketError {
    let what = what.into();
    move |source| SocketError { what, source }
}

/// The runtime's side of the thread: settles requests and stops it.
pub struct Handle {
    control: Mutex<zmq::Socket>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    fn send(&self, frames: Frames) {
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        // The inproc pipe has no high-water mark, so this never waits; it
        // fails only once the thread is gone, when there is no one to tell.
        if let Err(e) = send_frames(&control, &frames, zmq::DONTWAIT) {
            tracing::debug!(error = %e, "the socket thread is gone");
        }
    }

    /// Sends a `router` reply (route included) and frees its slot.
    pub fn reply(&self, frames: Frames) {
        let mut message = vec![REPLY.to_vec()];
        message.extend(frames);
        self.send(message);
    }

    /// Frees the slot of a request settled without a reply (`pull`, `sub`).
    pub fn settled(&self) {
        self.send(vec![SETTLED.to_vec()]);
    }

    /// Stops the thread (closing the bound socket, after sending the replies
    /// already given) and waits for it.
    pub fn stop(&self) {
        self.send(vec![STOP.to_vec()]);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Binds the socket as `options` say and starts its thread.
pub fn open(
    ctx: &zmq::Context,
    options: Options,
) -> Result<(Handle, mpsc::UnboundedReceiver<Received>), SocketError> {
    // The ZAP handler is bound before the socket, so that no client
    // connects before keys are checked.
    let zap = match &options.curve {
        Some(keys) => {
            let zap = ctx.socket(zmq::REP).map_err(context("ZAP socket"))?;
            zap.bind(ZAP_ENDPOINT)
                .map_err(context("bind the ZAP handler"))?;
            Some((
                zap,
                keys.client_keys.iter().cloned().collect::<HashSet<_>>(),
            ))
        }
        None => None,
    };
    let kind = match options.pattern {
        ZeroMqPattern::Router => zmq::ROUTER,
        ZeroMqPattern::Pull => zmq::PULL,
        ZeroMqPattern::Sub => zmq::SUB,
    };
    let bound = ctx.socket(kind).map_err(context("socket"))?;
    bound.set_linger(LINGER_MS).map_err(context("ZMQ_LINGER"))?;
    if let Some(keys) = &options.curve {
        bound
            .set_zap_domain(ZAP_DOMAIN)
            .map_err(context("ZMQ_ZAP_DOMAIN"))?;
        bound
            .set_curve_server(true)
            .map_err(context("ZMQ_CURVE_SERVER"))?;
        bound
            .set_curve_secretkey(&keys.secret_key)
            .map_err(context("ZMQ_CURVE_SECRETKEY"))?;
    }
    for topic in &options.subscribe {
        bound
            .set_subscribe(topic.as_bytes())
            .map_err(context(format!("subscribe to {topic:?}")))?;
    }
    bound
        .bind(&options.endpoint)
        .map_err(context(format!("bind {}", options.endpoint)))?;

    let control_endpoint = format!("inproc://idemq-control-{}", uuid::Uuid::new_v4().simple());
    let control_in = ctx.socket(zmq::PULL).map_err(context("control socket"))?;
    control_in.set_rcvhwm(0).map_err(context("ZMQ_RCVHWM"))?;
    control_in
        .bind(&control_endpoint)
        .map_err(context("bind the control socket"))?;
    let control_out = ctx.socket(zmq::PUSH).map_err(context("control socket"))?;
    control_out.set_sndhwm(0).map_err(context("ZMQ_SNDHWM"))?;
    control_out
        .connect(&control_endpoint)
        .map_err(context("connect the control socket"))?;

    let (tx, rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("idemq-zeromq".into())
        .spawn(move || {
            Thread {
                pattern: options.pattern,
                bound,
                control: control_in,
                zap,
                max_in_flight: options.max_in_flight,
                in_flight: 0,
                tx,
            }
            .run()
        })
        .map_err(|e| SocketError {
            what: format!("start the socket thread: {e}"),
            source: zmq::Error::EFAULT,
        })?;
    Ok((
        Handle {
            control: Mutex::new(control_out),
            thread: Mutex::new(Some(thread)),
        },
        rx,
    ))
}

struct Thread {
    pattern: ZeroMqPattern,
    bound: zmq::Socket,
    control: zmq::Socket,
    zap: Option<(zmq::Socket, HashSet<Vec<u8>>)>,
    max_in_flight: usize,
    in_flight: usize,
    tx: mpsc::UnboundedSender<Received>,
}

impl Thread {
    fn run(mut self) {
        loop {
            let reading = self.in_flight < self.max_in_flight;
            let (control, zap, bound) = {
                let mut items = vec![self.control.as_poll_item(zmq::POLLIN)];
                if let Some((zap, _)) = &self.zap {
                    items.push(zap.as_poll_item(zmq::POLLIN));
                }
                if reading {
                    items.push(self.bound.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, -1) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "zmq_poll failed: the ZeroMQ endpoint stops");
                        return;
                    }
                }
                let zap = self.zap.is_some() && items[1].is_readable();
                let bound = reading && items.last().is_some_and(|i| i.is_readable());
                (items[0].is_readable(), zap, bound)
            };
            if control && !self.serve_control() {
                return;
            }
            if zap {
                self.serve_zap();
            }
            if bound && !self.read() {
                return;
            }
        }
    }

    /// Applies what the runtime sent; false once told to stop.
    fn serve_control(&mut self) -> bool {
        loop {
            let mut frames = match self.control.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return true,
                Err(e) => {
                    tracing::error!(error = %e, "reading the control socket failed");
                    return false;
                }
            };
            let tag = frames.remove(0);
            match tag.as_slice() {
                REPLY => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    // A ROUTER drops a reply to a peer that is gone (or whose
                    // queue is full): the peer sends the request again.
                    if let Err(e) = send_frames(&self.bound, &frames, zmq::DONTWAIT) {
                        tracing::debug!(error = %e, "reply not sent");
                    }
                }
                SETTLED => self.in_flight = self.in_flight.saturating_sub(1),
                _ => return false,
            }
        }
    }

    /// Answers one ZAP request: a CURVE client whose public key is allowed
    /// gets 200, any other 400 (and its connection is closed).
    fn serve_zap(&mut self) {
        let Some((zap, allowed)) = &self.zap else {
            return;
        };
        let request = match zap.recv_multipart(zmq::DONTWAIT) {
            Ok(request) => request,
            Err(_) => return,
        };
        // [version, request id, domain, address, routing id, mechanism, credentials…]
        let request_id = request.get(1).cloned().unwrap_or_default();
        let address = request
            .get(3)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_default();
        let mechanism = request.get(5).map(Vec::as_slice).unwrap_or_default();
        let allowed =
            mechanism == b"CURVE" && request.get(6).is_some_and(|key| allowed.contains(key));
        let (code, text): (&[u8], &[u8]) = if allowed {
            (b"200", b"OK")
        } else {
            tracing::warn!(%address, "refused a ZeroMQ client: its CURVE key is not among the allowed client keys");
            (b"400", b"client key not allowed")
        };
        let reply: Vec<&[u8]> = vec![b"1.0", &request_id, code, text, b"", b""];
        if let Err(e) = zap.send_multipart(reply, 0) {
            tracing::warn!(error = %e, "ZAP reply not sent");
        }
    }

    /// Reads requests while slots are free; false when the runtime is gone.
    fn read(&mut self) -> bool {
        while self.in_flight < self.max_in_flight {
            let frames = match self.bound.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "receive failed");
                    return true;
                }
            };
            let received = match self.pattern {
                ZeroMqPattern::Router => {
                    let routed = wire::split_route(frames);
                    Received {
                        route: routed.route,
                        frames: routed.frames,
                    }
                }
                ZeroMqPattern::Pull | ZeroMqPattern::Sub => Received {
                    route: Vec::new(),
                    frames,
                },
            };
            self.in_flight += 1;
            if self.tx.send(received).is_err() {
                return false;
            }
        }
        true
    }
}
