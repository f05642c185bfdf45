//! Fills a data directory with queued messages straight through the store's log
//! writer, as the server would have queued them, for recovery benchmarks (`ringmail
//! queue list` or a restart on a large queue) without minutes of SMTP load first.
//!
//!     ringmail-fill --data DIR --messages 1000000 --size 512 --shards 2
//!
//! `--history N` adds N messages that were relayed and are done (a remote recipient
//! and a `Delivered` update each): a log whose history is longer than what is live.
//! They are spread evenly among the queued ones, as a server that relays while mail
//! stays queued would have written them, so no prefix of the log is finished;
//! `--history-first` puts them all before the queued ones instead.
//!
//! `--users N` stores the messages in mailboxes instead (docs/mailboxes.md): N users
//! on shard 0, every message delivered once into one user's INBOX on the user's
//! home shard, nothing queued, then a snapshot of every shard (see
//! `ringmail_bench::recovery::fill_mailboxes`):
//!
//!     ringmail-fill --data DIR --users 10000 --messages 1000000 --size 512 --shards 2

use clap::Parser;
use glommio::LocalExecutor;
use ringmail::queue;
use ringmail_store::message::{self, Envelope, RcptStatus, RcptUpdate, Recipient};
use ringmail_store::segment;
use ringmail_store::{Kind, LogConfig, ShardLog, Tail};

#[derive(Parser)]
struct Args {
    /// A data directory that does not exist yet.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Messages in all, spread evenly over the shards.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Body bytes of each message.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Messages per group commit.
    #[arg(long, default_value_t = 2000)]
    batch: u64,
    /// Delivered (finished) messages in all, besides the queued ones.
    #[arg(long, default_value_t = 0)]
    history: u64,
    /// Write the delivered history before every queued message instead of among them.
    #[arg(long)]
    history_first: bool,
    /// Users whose INBOXes hold the messages (0: the messages are queued instead).
    #[arg(long, default_value_t = 0)]
    users: u64,
}

/// Whether message `i` (0-based) of `total` in a shard is history rather than queued:
/// `history` of them, evenly spread (Bresenham), or the first `history` ones.
fn is_history(i: u64, total: u64, history: u64, first: bool) -> bool {
    if first {
        i < history
    } else {
        (i + 1) * history / total > i * history / total
    }
}

fn main() {
    let args = Args::parse();
    if args.data.exists() {
        eprintln!("{} exists: give a new directory", args.data.display());
        std::process::exit(2);
    }
    ringmail_store::manifest::open_or_create(&args.data, args.shards).unwrap();
    if args.users > 0 {
        if args.history > 0 {
            eprintln!("--history is for queued messages, not with --users");
            std::process::exit(2);
        }
        let fill = ringmail_bench::recovery::MailboxFill {
            shards: args.shards,
            users: args.users,
            messages: args.messages,
            size: args.size,
            batch: args.batch,
        };
        let data = args.data.clone();
        if let Err(e) = LocalExecutor::default()
            .run(async move { ringmail_bench::recovery::fill_mailboxes(&data, &fill).await })
        {
            eprintln!("ringmail-fill: {e}");
            std::process::exit(1);
        }
        return;
    }
    let body = vec![b'x'; args.size];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for shard in 0..args.shards {
        let dir = segment::shard_dir(&args.data, shard);
        let share =
            |n: u64| n / args.shards as u64 + u64::from((shard as u64) < n % args.shards as u64);
        let history = share(args.history);
        let count = share(args.messages) + history;
        let first = args.history_first;
        let body = body.clone();
        let batch = args.batch.max(1);
        LocalExecutor::default().run(async move {
            let log = ShardLog::open(&dir, shard, Tail::default(), LogConfig::default())
                .await
                .unwrap();
            let mut next = 1;
            while next <= count {
                let end = (next + batch).min(count + 1);
                let mut tickets = Vec::new();
                for i in next..end {
                    let done = is_history(i - 1, count, history, first);
                    let env = Envelope {
                        id: queue::make_id(shard, i),
                        received_at_ms: now_ms,
                        from: "load@ringmail-load.test".into(),
                        recipients: vec![Recipient {
                            address: if done {
                                "rcpt@relay.test"
                            } else {
                                "rcpt@localhost"
                            }
                            .into(),
                            notify: 0,
                            orcpt: None,
                        }],
                        helo: "ringmail-load.test".into(),
                        peer: "127.0.0.1".into(),
                        ..Envelope::default()
                    };
                    tickets.push(
                        log.append(Kind::Message, |o| {
                            message::encode(
                                o,
                                &env,
                                b"Received: from ringmail-load.test\r\n",
                                &body,
                            )
                        })
                        .unwrap(),
                    );
                    if done {
                        let update = RcptUpdate {
                            id: env.id,
                            rcpt: 0,
                            status: RcptStatus::Delivered,
                            attempts: 1,
                            next_attempt_ms: 0,
                            reply: "250 2.0.0 Ok".into(),
                        };
                        tickets.push(log.append(Kind::RcptUpdate, |o| update.encode(o)).unwrap());
                    }
                }
                for t in tickets {
                    log.durable(t).await.unwrap();
                }
                next = end;
            }
            log.close().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::is_history;

    #[test]
    fn history_is_spread_evenly_or_first() {
        let spread: Vec<bool> = (0..10).map(|i| is_history(i, 10, 5, false)).collect();
        assert_eq!(spread.iter().filter(|h| **h).count(), 5);
        assert!(spread.windows(2).all(|w| w[0] != w[1]), "{spread:?}");
        assert_eq!((0..7).filter(|&i| is_history(i, 7, 0, false)).count(), 0);
        assert_eq!((0..7).filter(|&i| is_history(i, 7, 7, false)).count(), 7);
        let first: Vec<bool> = (0..4).map(|i| is_history(i, 4, 2, true)).collect();
        assert_eq!(first, [true, true, false, false]);
    }
}
