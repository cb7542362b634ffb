//! Data-parallel training across processes, from torchrun's environment (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`): a rendezvous at rank 0, then a ring of TCP connections over
//! which every step's gradients are summed (ring all-reduce: reduce-scatter, then all-gather).
//!
//! Each chunk of the sum is added up on one rank and copied to the others, so every rank ends a
//! step with bit-identical gradients, and so with bit-identical weights.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::JobsError;

/// Sent first on every connection, so a stray client is refused rather than misread.
const MAGIC: &[u8; 8] = b"GANTRYDP";
/// How long ranks wait for each other to start; a gang's ranks start within seconds of one
/// another, but a node may be slow to pull a checkpoint first.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// A peer silent this long mid-step is taken as gone: the run fails and the gang is restarted.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Where this process stands in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// Reads torchrun's variables; `None` when `WORLD_SIZE` is unset or 1 (one process).
    pub fn from_env() -> Result<Option<DistEnv>, JobsError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, value: &str| -> Result<usize, JobsError> {
            value.parse().map_err(|_| JobsError::Group(format!("{name}={value:?} is not a number")))
        };
        let world_size = number("WORLD_SIZE", &world)?;
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number("RANK", &var("RANK").unwrap_or_default())?;
        let port = var("MASTER_PORT").unwrap_or_default();
        let master_port = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| JobsError::Group(format!("MASTER_PORT={port:?} is not a port")))?;
        let env = DistEnv {
            rank,
            world_size,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        };
        env.check()?;
        Ok(Some(env))
    }

    fn check(&self) -> Result<(), JobsError> {
        if self.rank >= self.world_size {
            return Err(JobsError::Group(format!("RANK {} is not below WORLD_SIZE {}", self.rank, self.world_size)));
        }
        Ok(())
    }

    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// A joined ring: this rank sends to the next and receives from the previous one.
pub struct Ring {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobsError {
    let context = context.into();
    move |source| JobsError::GroupIo { context, source }
}

impl Ring {
    /// Meets the other ranks and connects the ring. Rank 0 listens on `MASTER_PORT`; the others
    /// tell it where they listen, and it tells each rank where its successor is.
    pub fn join(env: &DistEnv) -> Result<Ring, JobsError> {
        env.check()?;
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let (listener, next_addr) = if env.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", env.master_port))
                .map_err(io(format!("listening on MASTER_PORT {}", env.master_port)))?;
            let successor = gather(&listener, env, deadline)?;
            (listener, successor)
        } else {
            let listener = TcpListener::bind("0.0.0.0:0").map_err(io("listening for the previous rank"))?;
            let port = listener.local_addr().map_err(io("reading the listening port"))?.port();
            let mut master = connect(&env.master(), deadline)?;
            master.write_all(MAGIC).map_err(io("joining rank 0"))?;
            write_u32s(&mut master, &[env.rank as u32, env.world_size as u32, u32::from(port)])
                .map_err(io("joining rank 0"))?;
            let successor = read_string(&mut master).map_err(io("reading the ring's layout from rank 0"))?;
            let successor = if env.rank + 1 == env.world_size { env.master() } else { successor };
            (listener, successor)
        };
        let mut next = connect(&next_addr, deadline)?;
        next.write_all(MAGIC).and_then(|()| write_u32s(&mut next, &[env.rank as u32])).map_err(io("greeting"))?;
        let expected = (env.rank + env.world_size - 1) % env.world_size;
        let prev = accept(&listener, deadline, |stream| {
            let [rank] = read_hello::<1>(stream)?;
            Ok(rank as usize == expected)
        })?;
        for stream in [&next, &prev] {
            stream.set_nodelay(true).map_err(io("configuring a ring connection"))?;
            stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io("configuring a ring connection"))?;
            stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io("configuring a ring connection"))?;
        }
        Ok(Ring { rank: env.rank, world: env.world_size, next, prev })
    }

    /// Replaces `values` on every rank by their element-wise sum over the ranks. Every rank must
    /// call it with the same length.
    pub fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), JobsError> {
        let (w, r, n) = (self.world, self.rank, values.len());
        let chunk = |i: usize| (i * n / w)..((i + 1) * n / w);
        let mut incoming = Vec::new();
        // Reduce-scatter: after w-1 steps this rank holds the whole sum of chunk r+1.
        for s in 0..w - 1 {
            let (send, recv) = (chunk((r + w - s) % w), chunk((r + 2 * w - s - 1) % w));
            self.exchange(&values[send], recv.len(), &mut incoming)?;
            for (v, add) in values[recv].iter_mut().zip(&incoming) {
                *v += add;
            }
        }
        // All-gather: each finished chunk travels once around the ring.
        for s in 0..w - 1 {
            let (send, recv) = (chunk((r + 1 + w - s) % w), chunk((r + w - s) % w));
            self.exchange(&values[send], recv.len(), &mut incoming)?;
            values[recv].copy_from_slice(&incoming);
        }
        Ok(())
    }

    /// Sends `out` to the next rank while receiving `len` values from the previous one (both at
    /// once: a chunk larger than the socket buffers would otherwise deadlock the ring).
    fn exchange(&mut self, out: &[f32], len: usize, incoming: &mut Vec<f32>) -> Result<(), JobsError> {
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        let next = &mut self.next;
        let prev = &mut self.prev;
        let mut buf = vec![0u8; len * 4];
        let (sent, received) = std::thread::scope(|scope| {
            let sender = scope.spawn(move || next.write_all(&bytes));
            let received = prev.read_exact(&mut buf);
            (sender.join().unwrap_or_else(|_| Err(std::io::Error::other("sender panicked"))), received)
        });
        sent.map_err(io("sending gradients to the next rank"))?;
        received.map_err(io("receiving gradients from the previous rank"))?;
        incoming.clear();
        incoming.extend(buf.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        Ok(())
    }
}

/// Rank 0: takes every other rank's hello, then sends each its successor's address. Returns
/// rank 1's address, rank 0's own successor.
fn gather(listener: &TcpListener, env: &DistEnv, deadline: Instant) -> Result<String, JobsError> {
    let mut joined: Vec<Option<(TcpStream, String)>> = (0..env.world_size).map(|_| None).collect();
    while joined.iter().skip(1).any(Option::is_none) {
        let mut hello = None;
        let stream = accept(listener, deadline, |stream| {
            let [rank, world, port] = read_hello::<3>(stream)?;
            let ok = world as usize == env.world_size && (1..env.world_size).contains(&(rank as usize));
            hello = Some((rank as usize, port));
            Ok(ok)
        })?;
        let (rank, port) = hello.expect("accepted streams said hello");
        let ip = stream.peer_addr().map_err(io("reading a rank's address"))?.ip();
        if joined[rank].is_some() {
            return Err(JobsError::Group(format!("two processes joined as rank {rank}")));
        }
        joined[rank] = Some((stream, std::net::SocketAddr::new(ip, port as u16).to_string()));
    }
    let addresses: Vec<String> = joined.iter().skip(1).map(|j| j.as_ref().expect("all joined").1.clone()).collect();
    for (rank, slot) in joined.iter_mut().enumerate().skip(1) {
        let (stream, _) = slot.as_mut().expect("all joined");
        // Rank w-1's successor is rank 0, which it already knows.
        let successor = addresses.get(rank).map_or("", String::as_str);
        write_string(stream, successor).map_err(io(format!("sending rank {rank} its successor")))?;
    }
    Ok(addresses[0].clone())
}

/// Connects to `addr`, retrying until `deadline`: the other side may not have started yet.
fn connect(addr: &str, deadline: Instant) -> Result<TcpStream, JobsError> {
    loop {
        let attempt = addr.to_socket_addrs().and_then(|mut addrs| {
            let addr = addrs.next().ok_or_else(|| std::io::Error::other("no address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => {
                return Err(JobsError::GroupIo { context: format!("connecting to {addr}"), source: e });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Accepts connections until one passes `hello` (which reads its greeting), or `deadline`.
fn accept(
    listener: &TcpListener,
    deadline: Instant,
    mut hello: impl FnMut(&mut TcpStream) -> std::io::Result<bool>,
) -> Result<TcpStream, JobsError> {
    listener.set_nonblocking(true).map_err(io("polling for peers"))?;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(io("accepting a peer"))?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("accepting a peer"))?;
                // A stranger or a wrong greeting is dropped; the right peer may still come.
                if let Ok(true) = hello(&mut stream) {
                    return Ok(stream);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(JobsError::Group(format!("not every rank joined within {} s", JOIN_TIMEOUT.as_secs())));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(JobsError::GroupIo { context: "accepting a peer".into(), source: e }),
        }
    }
}

fn read_hello<const N: usize>(stream: &mut TcpStream) -> std::io::Result<[u32; N]> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(std::io::Error::other("not a gantry rank"));
    }
    let mut out = [0u32; N];
    for v in &mut out {
        let mut b = [0u8; 4];
        stream.read_exact(&mut b)?;
        *v = u32::from_le_bytes(b);
    }
    Ok(out)
}

fn write_u32s(stream: &mut TcpStream, values: &[u32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    stream.write_all(&bytes)
}

fn write_string(stream: &mut TcpStream, s: &str) -> std::io::Result<()> {
    write_u32s(stream, &[s.len() as u32])?;
    stream.write_all(s.as_bytes())
}

fn read_string(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1024 {
        return Err(std::io::Error::other("address too long"));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `f` on `world` ranks joined into one ring, each in its own thread.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, Ring) -> T + Sync) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    scope.spawn(move || {
                        let env =
                            DistEnv { rank, world_size: world, master_addr: "127.0.0.1".into(), master_port: port };
                        f(rank, Ring::join(&env).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_the_same_sum() {
        for world in [2, 3, 4] {
            // Lengths that do and do not divide by the world size, and one shorter than it.
            for n in [1usize, 7, 1000, 70_001] {
                let input = |rank: usize| -> Vec<f32> { (0..n).map(|i| (i * (rank + 1)) as f32 * 0.5).collect() };
                let results = on_ranks(world, |rank, mut ring| {
                    let mut v = input(rank);
                    ring.all_reduce_sum(&mut v).unwrap();
                    v
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(input).collect();
                let expected: Vec<f32> = (0..n).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got.len(), n);
                    for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                            "world {world} rank {rank} [{i}]: {a} vs {b}"
                        );
                    }
                    // Bit-identical on every rank, not merely close.
                    assert_eq!(got, &results[0], "world {world}: rank {rank} differs from rank 0");
                }
            }
        }
    }

    #[test]
    fn a_stranger_on_the_master_port_does_not_break_the_rendezvous() {
        let port = free_port();
        std::thread::scope(|scope| {
            let env = |rank| DistEnv { rank, world_size: 2, master_addr: "127.0.0.1".into(), master_port: port };
            let master = scope.spawn(move || Ring::join(&env(0)).map(|_| ()));
            // Someone else connects first and sends garbage.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut stranger = connect(&format!("127.0.0.1:{port}"), deadline).unwrap();
            stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let worker = scope.spawn(move || Ring::join(&env(1)).map(|_| ()));
            master.join().unwrap().unwrap();
            worker.join().unwrap().unwrap();
        });
    }

    #[test]
    fn bad_environments_are_refused_with_the_variable() {
        let env = DistEnv { rank: 2, world_size: 2, master_addr: "127.0.0.1".into(), master_port: 1 };
        let err = env.check().unwrap_err().to_string();
        assert!(err.contains("RANK 2"), "{err}");
    }
}
