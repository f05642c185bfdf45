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
        Sink::serve(sink::bind(addr).unwrap(), faults)
    }

    /// Two sinks on one port (MX hosts share the MX port): on `a` and on `b`.
    pub fn pair(a: std::net::IpAddr, b: std::net::IpAddr, faults: Faults) -> (Sink, Sink) {
        // The port is free on `a`; another program may hold it on `b`: then another.
        for _ in 0..50 {
            let first = sink::bind(SocketAddr::new(a, 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            if let Ok(second) = sink::bind(SocketAddr::new(b, port)) {
                return (Sink::serve(first, faults), Sink::serve(second, faults));
            }
        }
        panic!("no port free on both {a} and {b}");
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
