//! ringmail's benchmark tools: the `ringmail-load` generator (and its library, used by
//! the tests), plus the criterion suites under `benches/`.

pub mod compare;
pub mod load;
pub mod procstat;
pub mod recovery;
pub mod ring;
pub mod sink;
pub mod wamp;
