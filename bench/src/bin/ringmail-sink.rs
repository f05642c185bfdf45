//! `ringmail-sink --listen ADDR [--tempfail ‰] [--permfail ‰] [--disconnect ‰]`: a fast
//! SMTP sink. Runs until SIGINT/SIGTERM (or --seconds), then prints its counters as
//! one JSON object.

use clap::Parser;
use ringmail_bench::sink::{self, Counters, Faults};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "ringmail-sink",
    about = "A fast SMTP sink that counts, checksums and injects faults"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:2526")]
    listen: std::net::SocketAddr,
    /// Per mille of messages answered 451.
    #[arg(long, default_value_t = 0)]
    tempfail: u32,
    /// Per mille of messages answered 554.
    #[arg(long, default_value_t = 0)]
    permfail: u32,
    /// Per mille of messages whose connection is dropped instead of answered.
    #[arg(long, default_value_t = 0)]
    disconnect: u32,
    /// Verify every message against its X-Load-Checksum header (ringmail-load adds it).
    #[arg(long)]
    verify: bool,
    /// Answer the first N messages 451 (to test retries).
    #[arg(long, default_value_t = 0)]
    tempfail_first: u64,
    /// Stop after this many seconds (0: only on a signal).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    if a.tempfail + a.permfail + a.disconnect > 1000 {
        eprintln!("ringmail-sink: the fault shares add up to more than 1000 per mille");
        return std::process::ExitCode::FAILURE;
    }
    let listener = match sink::bind(a.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ringmail-sink: cannot listen on {}: {e}", a.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: plain signal-mask calls on initialised sets.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: valid set and out pointer.
            unsafe { libc::sigwait(&set, &mut sig) };
            stop.store(true, Ordering::SeqCst);
        });
    }
    if a.seconds > 0 {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(a.seconds));
            stop.store(true, Ordering::SeqCst);
        });
    }
    eprintln!("ringmail-sink listening on {}", a.listen);
    let counters = Arc::new(Counters::default());
    let faults = Faults {
        tempfail_permille: a.tempfail,
        permfail_permille: a.permfail,
        disconnect_permille: a.disconnect,
        verify: a.verify,
        tempfail_first: a.tempfail_first,
    };
    if let Err(e) = sink::serve(listener, faults, counters.clone(), stop) {
        eprintln!("ringmail-sink: {e}");
        return std::process::ExitCode::FAILURE;
    }
    println!("{}", counters.json());
    std::process::ExitCode::SUCCESS
}
