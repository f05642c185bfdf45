//! A stop signal for an executor's own listeners (the control socket, the admin
//! listener): whatever waits on a client races it, and `stop` ends every such wait.

use event_listener::Event;
use std::cell::Cell;
use std::future::Future;

#[derive(Default)]
pub struct Stop {
    stopping: Cell<bool>,
    event: Event,
}

impl Stop {
    /// Ends every `or_stopped` wait, now and later.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.event.notify(usize::MAX);
    }

    /// What `fut` gives, or None once `stop` was called (before or during the wait).
    pub async fn or_stopped<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let stopped = self.event.listen();
        if self.stopping.get() {
            return None;
        }
        futures_lite::future::or(async { Some(fut.await) }, async {
            stopped.await;
            None
        })
        .await
    }
}
