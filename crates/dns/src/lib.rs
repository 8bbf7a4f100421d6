//! The DNS traffic manager: answer tables rebuilt on health changes ([`table`]), safe failback
//! for priority routing ([`failback`]), the wire format ([`wire`]), the authoritative server
//! ([`server`]) with response-rate limiting of its UDP answers ([`rrl`]), and the manager that
//! keeps the tables current ([`manager`]).

pub mod failback;
pub mod manager;
pub mod rrl;
pub mod server;
pub mod table;
pub mod wire;
