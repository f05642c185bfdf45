//! ringmail-sink in a thread of the test process, as a remote MX or relay target.

use ringmail_bench::sink::{self, Counters, Faults};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Sink {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on `addr` (port 0: any free port).
    pub fn start(addr: SocketAddr, faults: Faults) -> Sink {
        Self::serve(sink::bind(addr).unwrap(), faults)
    }

    /// Serves on a listener the test bound already (from `sink::bind`).
    pub fn serve(listener: std::net::TcpListener, faults: Faults) -> Sink {
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        let thread = Some(std::thread::spawn(move || {
            sink::serve(listener, faults, c, s).unwrap()
        }));
        Sink {
            addr,
            counters,
            stop,
            thread,
        }
    }

    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
