//! Fills a data directory with queued messages straight through the store's log
//! writer, as the server would have queued them, for recovery benchmarks (`ringmail
//! queue list` or a restart on a large queue) without minutes of SMTP load first.
//!
//!     ringmail-fill --data DIR --messages 1000000 --size 512 --shards 2

use clap::Parser;
use glommio::LocalExecutor;
use ringmail::queue;
use ringmail_store::message::{self, Envelope, Recipient};
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
}

fn main() {
    let args = Args::parse();
    if args.data.exists() {
        eprintln!("{} exists: give a new directory", args.data.display());
        std::process::exit(2);
    }
    ringmail_store::manifest::open_or_create(&args.data, args.shards).unwrap();
    let body = vec![b'x'; args.size];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for shard in 0..args.shards {
        let dir = segment::shard_dir(&args.data, shard);
        let count = args.messages / args.shards as u64
            + u64::from((shard as u64) < args.messages % args.shards as u64);
        let body = body.clone();
        let batch = args.batch.max(1);
        LocalExecutor::default().run(async move {
            let log = ShardLog::open(&dir, shard, Tail::default(), LogConfig::default())
                .await
                .unwrap();
            let mut next = 1;
            while next <= count {
                let end = (next + batch).min(count + 1);
                let tickets: Vec<_> = (next..end)
                    .map(|i| {
                        let env = Envelope {
                            id: queue::make_id(shard, i),
                            received_at_ms: now_ms,
                            from: "load@ringmail-load.test".into(),
                            recipients: vec![Recipient {
                                address: "rcpt@localhost".into(),
                                notify: 0,
                                orcpt: None,
                            }],
                            helo: "ringmail-load.test".into(),
                            peer: "127.0.0.1".into(),
                            ..Envelope::default()
                        };
                        log.append(Kind::Message, |o| {
                            message::encode(
                                o,
                                &env,
                                b"Received: from ringmail-load.test\r\n",
                                &body,
                            )
                        })
                        .unwrap()
                    })
                    .collect();
                for t in tickets {
                    log.durable(t).await.unwrap();
                }
                next = end;
            }
            log.close().await;
        });
    }
}
