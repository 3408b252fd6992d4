//! flowguard's user side: loads and attaches the kernel side, keeps its
//! endpoint map in sync, and shows what happened. The binary `flowguard`
//! is a thin command line over these modules.

pub mod agent;
pub mod children;
pub mod conntrack;
pub mod doctor;
pub mod endpoints;
pub mod events;
pub mod fdb;
pub mod flowtable;
pub mod instances;
pub mod links;
pub mod loader;
pub mod metrics;
pub mod neigh;
pub mod netlink;
pub mod out;
pub mod probe;
pub mod run_config;
pub mod settings;
pub mod status;
pub mod sys;
