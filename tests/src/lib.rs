pub mod flow;
pub mod flowguard_proc;
pub mod frames;
pub mod netns;
pub mod progs;
pub mod router;
pub mod stale;
pub mod topology;
