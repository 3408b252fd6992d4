//! Bounded waits: observe something until it holds or a timeout passes. The
//! one place tests poll with a deadline; a timeout names what was awaited
//! and the last thing observed, so a failure says where it stopped.

use std::{
    fmt,
    time::{Duration, Instant},
};

/// How often [`Wait::poll`] observes unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// A bounded wait for one thing: what it is (for the timeout's message),
/// how long it may take, and how often to look.
#[derive(Clone, Debug)]
pub struct Wait {
    what: String,
    timeout: Duration,
    interval: Duration,
}

/// A wait that ran out of time, with the last observation.
#[derive(Debug)]
pub struct TimedOut<V> {
    pub what: String,
    pub timeout: Duration,
    pub last: V,
}

impl<V> fmt::Display for TimedOut<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.timeout, self.what
        )
    }
}

impl<V: fmt::Debug> TimedOut<V> {
    /// The message with the last observation.
    pub fn report(&self) -> String {
        format!("{self}; last seen: {:#?}", self.last)
    }
}

impl<V: fmt::Debug> std::error::Error for TimedOut<V> {}

/// Text observed (a scrape, a log): shown as it is in a timeout's message,
/// not as an escaped one-line string.
#[derive(Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\n{}", self.0)
    }
}

impl Wait {
    /// A wait for `what` of at most `timeout`, looking every
    /// [`DEFAULT_INTERVAL`].
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Self {
            what: what.into(),
            timeout,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Looks every `interval` instead (an observation that costs a process).
    pub fn every(self, interval: Duration) -> Self {
        Self { interval, ..self }
    }

    /// Observes until `done` holds for an observation and returns that one;
    /// after the timeout, returns the last one in the error. Observes at
    /// least once, and once more at the deadline.
    pub fn poll<V>(
        &self,
        observe: impl FnMut() -> V,
        done: impl FnMut(&V) -> bool,
    ) -> Result<V, TimedOut<V>> {
        self.poll_pausing(observe, done, std::thread::sleep)
    }

    /// Like [`Wait::poll`], with `pause(at_most)` between observations
    /// instead of a sleep: for a wait that can wake up early (a condition
    /// variable, a child's exit).
    pub fn poll_pausing<V>(
        &self,
        mut observe: impl FnMut() -> V,
        mut done: impl FnMut(&V) -> bool,
        mut pause: impl FnMut(Duration),
    ) -> Result<V, TimedOut<V>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let seen = observe();
            if done(&seen) {
                return Ok(seen);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(seen));
            }
            pause(left.min(self.interval));
        }
    }

    /// Like [`Wait::poll`], but panics on timeout with what was awaited and
    /// the last observation.
    pub fn until<V: fmt::Debug>(
        &self,
        observe: impl FnMut() -> V,
        done: impl FnMut(&V) -> bool,
    ) -> V {
        self.poll(observe, done)
            .unwrap_or_else(|timed_out| panic!("{}", timed_out.report()))
    }

    /// The same bound for a wait driven by `state` itself: until
    /// `done(state)` holds, `advance(state, left)` waits for what may change
    /// it (an event, at most `left`). On timeout the caller describes the
    /// state it has back.
    pub async fn poll_async<S: ?Sized>(
        &self,
        state: &mut S,
        mut done: impl FnMut(&mut S) -> bool,
        mut advance: impl AsyncFnMut(&mut S, Duration),
    ) -> Result<(), TimedOut<()>> {
        let deadline = Instant::now() + self.timeout;
        while !done(state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(()));
            }
            advance(state, left).await;
        }
        Ok(())
    }

    fn timed_out<V>(&self, last: V) -> TimedOut<V> {
        TimedOut {
            what: self.what.clone(),
            timeout: self.timeout,
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_observation_that_holds() {
        let mut n = 0;
        let got = Wait::new("three", Duration::from_secs(5))
            .every(Duration::from_millis(1))
            .poll(
                || {
                    n += 1;
                    n
                },
                |&n| n == 3,
            );
        assert_eq!(got.unwrap(), 3);
    }

    #[test]
    fn a_timeout_names_what_and_the_last_observation() {
        let mut n = 0;
        let err = Wait::new("a miracle", Duration::from_millis(30))
            .every(Duration::from_millis(5))
            .poll(
                || {
                    n += 1;
                    n
                },
                |_| false,
            )
            .unwrap_err();
        assert_eq!(err.last, n, "the last observation");
        assert!(n >= 2, "observed again at the deadline: {n}");
        let report = err.report();
        assert!(
            report.starts_with("timed out after 30ms waiting for a miracle; last seen: "),
            "{report}"
        );
    }

    #[test]
    fn an_async_wait_advances_until_done() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let wait = Wait::new("five steps", Duration::from_secs(5));
        let mut steps = 0u32;
        rt.block_on(wait.poll_async(&mut steps, |s| *s == 5, async |s, _| *s += 1))
            .unwrap();
        assert_eq!(steps, 5);
        let never = Wait::new("never", Duration::from_millis(20));
        let err = rt
            .block_on(never.poll_async(
                &mut steps,
                |_| false,
                async |_, left| {
                    tokio::time::sleep(left).await;
                },
            ))
            .unwrap_err();
        assert_eq!(err.to_string(), "timed out after 20ms waiting for never");
    }
}
