//! ringmail's mailbox-access protocol cores, sans-IO: bytes in, replies and steps
//! out, no sockets, files, clocks or executors (the engine's drivers supply them).

pub mod pop3;
