//! The envelope facts the server core hands out, in its own types: the core knows
//! nothing of how the store encodes them (ingest converts).

/// DSN `RET=` (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ret {
    #[default]
    Unspecified,
    Full,
    Hdrs,
}

/// The `BODY=` a message was announced with (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    Unspecified,
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// DSN `NOTIFY=` bits (RFC 3461 §4.1).
pub mod notify {
    pub const NEVER: u8 = 1;
    pub const SUCCESS: u8 = 2;
    pub const FAILURE: u8 = 4;
    pub const DELAY: u8 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipient {
    /// The forward path without angle brackets, as given.
    pub address: String,
    /// `NOTIFY=` bits (see [`notify`]); 0 when the parameter was absent.
    pub notify: u8,
    /// `ORCPT=` as given (`addr-type;xtext`), if any.
    pub orcpt: Option<String>,
}
