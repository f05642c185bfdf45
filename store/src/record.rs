//! The record framing every segment is made of.
//!
//! ```text
//! +-----------+------------+------+-------------------+
//! | len: u32  | crc32c u32 | kind | payload (len B)   |
//! +-----------+------------+------+-------------------+
//! ```
//! `crc32c` covers `kind` and the payload, so a record whose length field was torn
//! is caught as well as one whose payload was. All integers are little endian.

/// Bytes before the payload: length, CRC, kind.
pub const RECORD_HEADER_BYTES: usize = 9;
/// No record may be larger than this; a length field above it is taken as corruption.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 256 << 20;

/// What a record holds. Values are on disk: never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A whole message: envelope, trace prefix and body (see `message`).
    Message = 1,
    /// A delivery attempt's outcome for one recipient (see `message::RcptUpdate`).
    RcptUpdate = 2,
    /// The shard's id counter, written before compaction deletes old segments, so
    /// that ids stay unique when the messages that carried them are gone.
    Checkpoint = 3,
    /// A live message's record copied forward by compaction: the payload of its
    /// `Message` record as it was. Replay moves the message's handle here; a copy of a
    /// message no longer referenced is garbage.
    Copy = 4,
    /// A change to a user's mailboxes (see `mailbox` and docs/mailboxes.md): an op
    /// byte, then the op's fields.
    Mail = 5,
    /// A change to the accounts, aliases or catch-alls (shard 0 only; see `accounts`).
    Account = 6,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Message),
            2 => Some(Kind::RcptUpdate),
            3 => Some(Kind::Checkpoint),
            4 => Some(Kind::Copy),
            5 => Some(Kind::Mail),
            6 => Some(Kind::Account),
            _ => None,
        }
    }
}

/// Appends one framed record to `out`.
pub fn encode_into(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    assert!(
        payload.len() <= RECORD_PAYLOAD_BYTES_MAX,
        "record too large"
    );
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind as u8]), payload);
    out.reserve(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(payload);
}

/// Frames a record whose payload is produced by `write`, without an intermediate copy.
pub fn encode_with(out: &mut Vec<u8>, kind: Kind, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out[start + 8] = kind as u8;
    write(out);
    let len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(len <= RECORD_PAYLOAD_BYTES_MAX, "record too large");
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record read back from a segment.
#[derive(Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub kind: Kind,
    pub payload: &'a [u8],
    /// Bytes the record occupies, header included.
    pub total_len: usize,
}

/// Why the bytes at a position are not a whole, valid record.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends inside the record: a torn tail (or a caller that must read more).
    Incomplete,
    /// The header or payload does not check out: corruption.
    Corrupt(&'static str),
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<RecordRef<'_>, DecodeError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(DecodeError::Incomplete);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    let total_len = RECORD_HEADER_BYTES + len;
    if buf.len() < total_len {
        return Err(DecodeError::Incomplete);
    }
    if crc32c::crc32c(&buf[8..total_len]) != crc {
        return Err(DecodeError::Corrupt("record checksum mismatch"));
    }
    let kind = Kind::from_u8(buf[8]).ok_or(DecodeError::Corrupt("unknown record kind"))?;
    Ok(RecordRef {
        kind,
        payload: &buf[RECORD_HEADER_BYTES..total_len],
        total_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_both_encoders_agree() {
        let mut a = Vec::new();
        encode_into(&mut a, Kind::Message, b"hello");
        let mut b = Vec::new();
        encode_with(&mut b, Kind::Message, |o| o.extend_from_slice(b"hello"));
        assert_eq!(a, b);
        let r = decode(&a).unwrap();
        assert_eq!(r.payload, b"hello");
        assert_eq!(r.total_len, a.len());
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let mut a = Vec::new();
        encode_into(&mut a, Kind::Message, b"some payload bytes");
        for cut in 0..a.len() {
            assert_eq!(decode(&a[..cut]), Err(DecodeError::Incomplete), "cut {cut}");
        }
        for byte in 0..a.len() {
            for bit in 0..8 {
                let mut c = a.clone();
                c[byte] ^= 1 << bit;
                // A flipped length bit may make the record look longer (incomplete) or
                // shorter (checksum fails); it must never decode.
                assert!(decode(&c).is_err(), "flip {byte}:{bit}");
            }
        }
    }
}
