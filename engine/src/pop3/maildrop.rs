//! A POP3 session's maildrop, kept on the user's home shard: the exclusive lock
//! (RFC 1939 §8: `[IN-USE]` for a second session), INBOX as it was at login, and the
//! UPDATE state's changes (`\Seen` for what RETR sent, the expunge of what DELE
//! marked) made as the user's other mailbox changes are (`Home::change`).

use crate::mailbox::{ChangeError, Home, MailService};
use ringmail_store::mailbox::{FlagOp, SEEN};
use std::rc::Rc;

/// One message of the maildrop.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub uid: u32,
    /// Octets as served (the per-entry prefix included).
    pub size: u32,
    /// The stored message's handle id.
    pub message: u64,
}

/// INBOX at login.
#[derive(Debug, Clone)]
pub struct Opened {
    pub mailbox: u32,
    pub uidvalidity: u32,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Another session holds the maildrop.
    InUse,
    /// The home shard could not be reached, or its store failed.
    Store(String),
}

/// The UIDL of a message: its UID and its mailbox's UIDVALIDITY, so it is unique in
/// the maildrop and stable across sessions and restarts (Dovecot's default
/// `%08Xu%08Xv`, so a client moved between the two keeps its state).
pub fn uidl(uid: u32, uidvalidity: u32) -> String {
    format!("{uid:08X}{uidvalidity:08X}")
}

/// Locks `user`'s maildrop (creating the default mailboxes on a first login) and
/// returns INBOX as it is now.
pub async fn open(mail: &MailService, user: u64) -> Result<Opened, OpenError> {
    let answer = mail
        .on_home(user, move |home: Rc<Home>| {
            Box::pin(async move {
                if !home.lock_maildrop(user) {
                    return Err(OpenError::InUse);
                }
                let opened = match home.ensure_defaults(user).await {
                    Ok(()) => inbox(&home, user),
                    Err(e) => Err(OpenError::Store(format!("{e:?}"))),
                };
                if opened.is_err() {
                    home.unlock_maildrop(user);
                }
                opened
            })
        })
        .await;
    answer.unwrap_or_else(|e| Err(OpenError::Store(e.to_string())))
}

fn inbox(home: &Home, user: u64) -> Result<Opened, OpenError> {
    let index = home.index();
    let mb = index
        .mailbox(user, "INBOX")
        .ok_or_else(|| OpenError::Store("the account has no INBOX".into()))?;
    Ok(Opened {
        mailbox: mb.id(),
        uidvalidity: mb.uidvalidity(),
        items: mb
            .entries()
            .iter()
            .map(|e| Item {
                uid: e.uid(),
                size: e.size(),
                message: e.message(),
            })
            .collect(),
    })
}

/// Ends a session: marks `seen` `\Seen`, expunges `expunge` (the UPDATE state; empty
/// when the session did not QUIT), and releases the lock whatever happened. Ok when
/// every change was made.
pub async fn close(
    mail: &MailService,
    user: u64,
    mailbox: u32,
    seen: Vec<u32>,
    expunge: Vec<u32>,
) -> Result<(), String> {
    let answer = mail
        .on_home(user, move |home: Rc<Home>| {
            Box::pin(async move {
                let r = update(&home, user, mailbox, &seen, &expunge).await;
                home.unlock_maildrop(user);
                r
            })
        })
        .await;
    answer.unwrap_or_else(|e| Err(e.to_string()))
}

async fn update(
    home: &Rc<Home>,
    user: u64,
    mailbox: u32,
    seen: &[u32],
    expunge: &[u32],
) -> Result<(), String> {
    // Flags only of what stays: an expunged message's flags do not matter.
    let seen: Vec<u32> = seen
        .iter()
        .copied()
        .filter(|u| !expunge.contains(u))
        .collect();
    let gone = |e: ChangeError| match e {
        // The user or INBOX went away meanwhile (account deleted): nothing to do.
        ChangeError::Refused(e) => format!("refused: {e:?}"),
        ChangeError::Store(e) => e,
    };
    // The expunge first: it is what QUIT answers for, and a failed flag change
    // must not keep what the user deleted.
    if !expunge.is_empty() {
        home.change(|ix| ix.begin_expunge(user, mailbox, expunge))
            .await
            .map_err(gone)?;
    }
    if !seen.is_empty() {
        if let Err(e) = home
            .change(|ix| ix.begin_set_flags(user, mailbox, &seen, FlagOp::Add, SEEN, &[], None))
            .await
        {
            tracing::warn!(user, error = %gone(e), "pop3: cannot mark retrieved messages seen");
        }
    }
    Ok(())
}
