//! A one-worker DataLoader: the CPU side of the next micro-batches (image decoding, tokenising,
//! resizing, pinning) runs on a scoped thread while the main thread computes the current one.
//!
//! The worker produces items in order into a bounded channel and ends when it runs out or when
//! its `send` fails because the consumer is gone, so an early exit (error, interrupt, non-finite
//! loss, panic) stops it after at most the item in hand; [`prefetch`] joins it before returning.

use std::sync::mpsc::{Receiver, sync_channel};

/// The items, in order, wherever they are made.
pub(crate) enum Feed<'a, T> {
    Inline(Box<dyn Iterator<Item = T> + 'a>),
    Worker(Receiver<T>),
}

impl<T> Iterator for Feed<'_, T> {
    type Item = T;
    /// `None` once the items are exhausted, or (worker) when the worker died.
    fn next(&mut self) -> Option<T> {
        match self {
            Feed::Inline(items) => items.next(),
            Feed::Worker(rx) => rx.recv().ok(),
        }
    }
}

/// Runs `body` over `items`, made `ahead` items ahead of their use on a worker thread (0: made
/// on this thread when `body` asks for them). A panic on the worker is re-raised here.
pub(crate) fn prefetch<'a, I, T, R>(ahead: usize, items: I, body: impl FnOnce(&mut Feed<'a, T>) -> R) -> R
where
    I: Iterator<Item = T> + Send + 'a,
    T: Send + 'a,
{
    if ahead == 0 {
        return body(&mut Feed::Inline(Box::new(items)));
    }
    std::thread::scope(|scope| {
        // The worker holds one finished item while it waits to send: `ahead` in all.
        let (tx, rx) = sync_channel(ahead - 1);
        let worker = std::thread::Builder::new()
            .name("pivot-prefetch".into())
            .spawn_scoped(scope, move || {
                for item in items {
                    if tx.send(item).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        let mut feed = Feed::Worker(rx);
        let out = body(&mut feed);
        drop(feed);
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
        out
    })
}
