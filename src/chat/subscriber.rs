//! The channel from a relay to its subscriber, bounded by bytes. The relay never waits for the
//! subscriber; a subscriber that falls more than `limit` bytes of events behind (it stopped
//! reading, or its network is slower than the model) is dropped with a `LIMIT_EXCEEDED` error,
//! while the answer goes on and is stored. Without the bound, one client that never reads made
//! the gateway hold the whole answer several times over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::events::ChatEvent;
use crate::error::AppError;

enum Delivery {
    Event(ChatEvent, usize),
    /// The subscriber fell too far behind; nothing follows.
    Dropped,
}

/// The relay's end.
pub struct Sender {
    tx: UnboundedSender<Delivery>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    dropped: bool,
}

/// The subscriber's end.
pub struct Receiver {
    rx: UnboundedReceiver<Delivery>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

pub fn channel(limit: usize) -> (Sender, Receiver) {
    let (tx, rx) = unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            queued: queued.clone(),
            limit,
            dropped: false,
        },
        Receiver { rx, queued, limit },
    )
}

impl Sender {
    /// Queues an event for the subscriber, or drops the subscriber if it is too far behind.
    /// Returns false once the subscriber is gone (left, or dropped).
    pub fn send(&mut self, event: ChatEvent) -> bool {
        if self.dropped {
            return false;
        }
        let weight = event.weight();
        if self.queued.load(Ordering::Acquire) + weight > self.limit {
            self.dropped = true;
            let _ = self.tx.send(Delivery::Dropped);
            return false;
        }
        self.queued.fetch_add(weight, Ordering::AcqRel);
        self.tx.send(Delivery::Event(event, weight)).is_ok()
    }
}

impl Receiver {
    /// The subscription's stream: the events, or an error where the subscriber was dropped.
    pub fn into_stream(self) -> BoxStream<'static, Result<ChatEvent, async_graphql::Error>> {
        futures::stream::unfold(Some(self), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.rx.recv().await? {
                Delivery::Event(event, weight) => {
                    receiver.queued.fetch_sub(weight, Ordering::AcqRel);
                    Some((Ok(event), Some(receiver)))
                }
                Delivery::Dropped => {
                    let error = AppError::LimitExceeded {
                        limit: "SUBSCRIBER_BUFFER_BYTES",
                        max: receiver.limit as u64,
                        message: "this subscription fell too far behind its answer and was \
                                  dropped; the answer goes on and is stored: read it with \
                                  `message(id)` once it ends"
                            .into(),
                    };
                    Some((Err(error.into()), None))
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::events::AnswerDelta;

    fn delta(text: &str) -> ChatEvent {
        ChatEvent::AnswerDelta(AnswerDelta {
            message_id: async_graphql::ID::default(),
            seq: 0,
            delta: text.into(),
        })
    }

    #[tokio::test]
    async fn a_subscriber_that_keeps_up_gets_everything_and_one_that_does_not_is_dropped() {
        let (mut tx, rx) = channel(4096);
        let chunk = "x".repeat(1000);
        // Read as they come: never more than one event queued.
        let mut stream = rx.into_stream();
        for _ in 0..100 {
            assert!(tx.send(delta(&chunk)));
            assert!(stream.next().await.unwrap().is_ok());
        }
        // Stop reading: three events fit, the fourth drops the subscriber.
        for _ in 0..3 {
            assert!(tx.send(delta(&chunk)));
        }
        assert!(!tx.send(delta(&chunk)));
        assert!(!tx.send(delta("later")), "nothing more once dropped");
        for _ in 0..3 {
            assert!(stream.next().await.unwrap().is_ok());
        }
        let Some(Err(error)) = stream.next().await else {
            panic!("the drop is reported as an error")
        };
        let code = error.extensions.unwrap().get("code").cloned();
        assert_eq!(code, Some(async_graphql::Value::from("LIMIT_EXCEEDED")));
        assert!(stream.next().await.is_none());
    }
}
