//! A login by name and password, the one way every frontend does it (POP3 USER/PASS
//! and AUTH PLAIN, SMTP AUTH, later IMAP): the name to an account, then the password
//! through `auth::Authenticator` (rate limit, cache, verification pool, failure delay).

use super::{delivery_address, DirectoryCell};
use crate::auth::{AuthError, Authenticator};
use ringmail_store::accounts::User;
use std::net::IpAddr;
use std::sync::Arc;

/// What a login attempt found.
pub struct Login {
    /// The account address the name stands for (for log lines, whether or not it
    /// exists).
    pub address: String,
    pub result: Result<Arc<User>, AuthError>,
}

/// Checks `password` for `name`: an account's address, or a bare local part of the
/// first local domain. An unknown name costs the same verification as a wrong
/// password (`Authenticator::verify` with no hash), so the two are not told apart.
pub async fn login(
    auth: &Authenticator,
    directory: &DirectoryCell,
    local_domains: &[String],
    name: &str,
    password: &str,
    peer: IpAddr,
) -> Login {
    let address = delivery_address(name, local_domains);
    let user = directory.load().user(&address).cloned();
    let phc = user.as_ref().map(|u| u.phc.clone());
    let checked = auth
        .verify(&address, password.as_bytes(), phc.as_deref(), peer)
        .await;
    let result = match (checked, user) {
        (Ok(()), Some(u)) => Ok(u),
        (Ok(()), None) => Err(AuthError::Failed),
        (Err(e), _) => Err(e),
    };
    Login { address, result }
}
