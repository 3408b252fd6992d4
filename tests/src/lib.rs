pub mod flowguard_proc;
pub mod netns;
pub mod topology;
