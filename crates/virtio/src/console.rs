//! virtio-console (virtio 1.x, 5.3) as a second console for the guest (`/dev/hvc0` in
//! Linux): one port, no multiport, queue 0 carries host input to the guest and queue 1
//! the guest's output.
//!
//! Backends: a file the output is appended to (no input), or a Unix socket that one
//! client at a time connects to (e.g. `socat - UNIX-CONNECT:PATH`): its bytes are the
//! guest's input, the guest's output goes to it, and a client that connects late first
//! gets the last 64 KiB of output. No vCPU waits on the host: output is handed to a
//! writer thread, input arrives on a reader thread that serves queue 0 through the
//! transport's [`Waker`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use dvmm_devices::GuestAccess;
use dvmm_sync::{CondvarExt, MutexExt};

use crate::pci::Waker;
use crate::queue::{Queue, QueueError};
use crate::VirtioDevice;

const QUEUE_SIZE: u16 = 128;
const RX: usize = 0;
const TX: usize = 1;
/// Output kept for a socket client that connects later.
const HISTORY: usize = 64 * 1024;
/// Input held for the guest before the reader stops reading (the guest posts buffers
/// as it consumes them).
const INPUT_MAX: usize = 64 * 1024;
/// Output waiting for a slow sink before the oldest is dropped (and counted).
const OUTPUT_MAX: usize = 1 << 20;
/// How often the device's threads look whether the device is gone.
const POLL: Duration = Duration::from_millis(100);

/// Socket files this process created, for [`remove_created_sockets`].
static CREATED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the console sockets this process created (and only those). The VMM calls it
/// on its way out: a process that ends does not drop its devices.
pub fn remove_created_sockets() {
    for path in CREATED.locked().drain(..) {
        let _ = std::fs::remove_file(path);
    }
}

/// Where the console's bytes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// Output appended to this file; no input.
    File(PathBuf),
    /// A Unix socket created at this path (which must not exist).
    Socket(PathBuf),
}

/// Why the console cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file cannot be opened.
    #[error("cannot open {path} for the guest's virtio-console output: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket path is taken.
    #[error(
        "the virtio-console socket {path} already exists; remove it or choose another path \
         (dvmm does not take over an existing file)"
    )]
    SocketExists {
        /// The path.
        path: PathBuf,
    },
    /// The socket cannot be created.
    #[error("cannot create the virtio-console socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default)]
struct State {
    /// Host bytes not yet given to the guest.
    input: VecDeque<u8>,
    /// Guest bytes not yet written to the sink.
    output: VecDeque<u8>,
    /// The last output, for a socket client that connects later.
    history: VecDeque<u8>,
    /// The socket client the output goes to.
    client: Option<UnixStream>,
    /// Output bytes dropped because the sink was too slow.
    lost: u64,
    /// The device is gone: its threads end.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Output waiting, or closed.
    wake_writer: Condvar,
}

enum Sink {
    File(File),
    Socket(UnixListener),
}

/// The console device.
pub struct Console {
    shared: Arc<Shared>,
    sink: Option<Sink>,
    /// The socket file, removed with the device.
    socket_path: Option<PathBuf>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// Opens `backend` (creates the file or the socket) now, so that a bad path fails
    /// before the guest runs.
    pub fn open(backend: &ConsoleBackend) -> Result<Console, ConsoleError> {
        let sink = match backend {
            ConsoleBackend::File(path) => Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.clone(),
                        source,
                    })?,
            ),
            ConsoleBackend::Socket(path) => {
                if path.symlink_metadata().is_ok() {
                    return Err(ConsoleError::SocketExists { path: path.clone() });
                }
                let listener = UnixListener::bind(path).map_err(|source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|source| ConsoleError::Socket {
                        path: path.clone(),
                        source,
                    })?;
                CREATED.locked().push(path.clone());
                Sink::Socket(listener)
            }
        };
        let socket_path = match backend {
            ConsoleBackend::Socket(p) => Some(p.clone()),
            ConsoleBackend::File(_) => None,
        };
        Ok(Console {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake_writer: Condvar::new(),
            }),
            sink: Some(sink),
            socket_path,
        })
    }

    /// Output bytes dropped so far because the sink did not keep up.
    pub fn lost(&self) -> u64 {
        self.shared.state.locked().lost
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shared.state.locked().closed = true;
        self.shared.wake_writer.notify_all();
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
            CREATED.locked().retain(|p| p != path);
        }
    }
}

/// Writes the guest's output to the file, or to the socket client when there is one.
fn writer(shared: Arc<Shared>, mut file: Option<File>) {
    loop {
        let (bytes, client) = {
            let mut st = shared.state.locked();
            while st.output.is_empty() && !st.closed {
                st = shared.wake_writer.wait_locked(st);
            }
            if st.closed && st.output.is_empty() {
                return;
            }
            let bytes: Vec<u8> = st.output.drain(..).collect();
            let client = st.client.as_ref().and_then(|c| c.try_clone().ok());
            (bytes, client)
        };
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(&bytes) {
                tracing::warn!(error = %e, "virtio-console: the output file failed; output stops");
                file = None;
            }
        } else if let Some(mut c) = client {
            if c.write_all(&bytes).is_err() {
                shared.state.locked().client = None;
            }
        }
    }
}

/// Accepts one client at a time on the socket and feeds its bytes to the guest.
fn serve_socket(shared: Arc<Shared>, listener: UnixListener, waker: Waker) {
    loop {
        if shared.state.locked().closed {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "virtio-console: accept failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let (Ok(()), Ok(()), Ok(out)) = (
            stream.set_nonblocking(false),
            stream.set_read_timeout(Some(POLL)),
            stream.try_clone(),
        ) else {
            continue;
        };
        {
            // The client first gets the recent output, then what follows, in order:
            // pending output is already in the history.
            let mut st = shared.state.locked();
            st.output = st.history.clone();
            st.client = Some(out);
        }
        shared.wake_writer.notify_all();
        if !read_client(&shared, stream, &waker) {
            return;
        }
        shared.state.locked().client = None;
    }
}

/// Reads one client until it hangs up; false if the device is gone.
fn read_client(shared: &Shared, mut stream: UnixStream, waker: &Waker) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        if shared.state.locked().closed {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                loop {
                    let mut st = shared.state.locked();
                    if st.closed {
                        return false;
                    }
                    if st.input.len() < INPUT_MAX {
                        st.input.extend(&buf[..n]);
                        break;
                    }
                    drop(st);
                    // The guest is not reading: hold the client back until it does.
                    std::thread::sleep(Duration::from_millis(10));
                    if !waker.wake(RX) {
                        return false;
                    }
                }
                if !waker.wake(RX) {
                    return false;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        crate::device_type::CONSOLE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none offered.
        data.fill(0);
    }

    fn set_waker(&mut self, waker: Waker) {
        let file = match self.sink.take() {
            Some(Sink::File(f)) => Some(f),
            Some(Sink::Socket(listener)) => {
                let shared = self.shared.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("virtio-console-in".into())
                    .spawn(move || serve_socket(shared, listener, waker))
                {
                    tracing::warn!(error = %e, "virtio-console: no input thread");
                }
                None
            }
            None => None,
        };
        let shared = self.shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("virtio-console-out".into())
            .spawn(move || writer(shared, file))
        {
            tracing::warn!(error = %e, "virtio-console: no output thread");
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &dyn GuestAccess,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        let mut st = self.shared.state.locked();
        match index {
            RX => {
                while !st.input.is_empty() {
                    let Some(chain) = queue.pop(mem)? else {
                        break;
                    };
                    let n = chain.write_all(mem, st.input.make_contiguous())?;
                    st.input.drain(..n);
                    queue.push_used(mem, chain.head, u32::try_from(n).unwrap_or(0))?;
                    used = true;
                }
            }
            TX => {
                while let Some(chain) = queue.pop(mem)? {
                    let bytes = chain.read_all(mem, 64 * 1024)?;
                    st.history.extend(&bytes);
                    let over = st.history.len().saturating_sub(HISTORY);
                    st.history.drain(..over);
                    st.output.extend(&bytes);
                    let over = st.output.len().saturating_sub(OUTPUT_MAX);
                    if over > 0 {
                        st.output.drain(..over);
                        st.lost += over as u64;
                    }
                    queue.push_used(mem, chain.head, 0)?;
                    used = true;
                }
                self.shared.wake_writer.notify_all();
            }
            _ => {}
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::tests::{Driver, Ram};
    use std::time::Instant;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    fn until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn send(console: &mut Console, ram: &Ram, bytes: &[u8]) {
        let mut q = Driver::queue(4);
        let mut drv = Driver {
            size: 4,
            avail_idx: 0,
        };
        ram.put(0x8000, bytes);
        Driver::desc(ram, 0, 0x8000, bytes.len() as u32, 0, 0);
        drv.offer(ram, 0);
        assert!(console.process_queue(TX, &mut q, ram).unwrap());
    }

    #[test]
    fn output_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hvc0.log");
        let mut c = Console::open(&ConsoleBackend::File(path.clone())).unwrap();
        c.set_waker(Waker::none());
        let ram = Ram::new(0x10000);
        send(&mut c, &ram, b"hello from the guest\n");
        until("the file has the output", || {
            std::fs::read(&path).unwrap_or_default() == b"hello from the guest\n"
        });
    }

    #[test]
    fn a_socket_client_gets_the_history_and_its_input_reaches_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hvc0.sock");
        let mut c = Console::open(&ConsoleBackend::Socket(path.clone())).unwrap();
        c.set_waker(Waker::none());
        let ram = Ram::new(0x10000);
        // Output before anyone connected is kept for the first client.
        send(&mut c, &ram, b"early line\n");
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 11];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early line\n");
        // The client's bytes go into the guest's receive buffer.
        client.write_all(b"typed").unwrap();
        let mut rx = Driver::queue(4);
        let mut drv = Driver {
            size: 4,
            avail_idx: 0,
        };
        Driver::desc(&ram, 0, 0x9000, 64, VRING_DESC_F_WRITE as u16, 0);
        drv.offer(&ram, 0);
        until("the input arrives", || {
            c.process_queue(RX, &mut rx, &ram).unwrap()
        });
        assert_eq!(ram.get(0x3004, 8), [0, 0, 0, 0, 5, 0, 0, 0], "5 bytes used");
        assert_eq!(ram.get(0x9000, 5), b"typed");
        drop(c);
        assert!(!path.exists(), "the socket goes with the device");
    }

    #[test]
    fn an_existing_socket_path_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = Console::open(&ConsoleBackend::Socket(file.path().into())).unwrap_err();
        assert!(matches!(e, ConsoleError::SocketExists { .. }), "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}
