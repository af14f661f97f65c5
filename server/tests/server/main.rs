//! The server in process on 127.0.0.1:0 with the tiny chat fixture: the HTTP API, its
//! refusals, WebSocket streams, graceful shutdown, and the official clients.

mod clients;
mod common;
mod http;
mod load;
mod rag;
mod ws;
