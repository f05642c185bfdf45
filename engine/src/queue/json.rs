//! The `queue list --json` form of a queued message.

use super::model::{QueuedMessage, RcptStatus};
use ringmail_store::message;

impl QueuedMessage {
    /// One line of `queue list --json` (JSON Lines: one object per queued message).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": message::format_id(self.id),
            "from": self.from,
            "rcpt": self.rcpt.iter().map(|r| serde_json::json!({
                "to": r.to,
                "status": r.status.as_str(),
                "attempts": r.attempts,
                "notify": message::notify::words(r.notify),
                "orcpt": r.orcpt,
                "next_attempt_ms": (r.status == RcptStatus::Deferred).then_some(r.next_attempt_ms),
                "reply": r.last_reply,
            })).collect::<Vec<_>>(),
            "size": self.size,
            "received_at_ms": self.received_at_ms,
            "crc32c": format!("{:08x}", self.body_crc32c),
            "body": match self.body_type {
                message::BodyType::Unspecified => None,
                message::BodyType::SevenBit => Some("7BIT"),
                message::BodyType::EightBitMime => Some("8BITMIME"),
                message::BodyType::BinaryMime => Some("BINARYMIME"),
            },
            "smtputf8": self.smtputf8,
            "ret": match self.ret {
                message::Ret::Unspecified => None,
                message::Ret::Full => Some("FULL"),
                message::Ret::Hdrs => Some("HDRS"),
            },
            "envid": self.envid,
        })
    }
}
