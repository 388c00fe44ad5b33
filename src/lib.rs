//! contralign: contrastive alignment (NCA, InfoNCA, DPO, SimPO, REFA) of Mistral and Mixtral
//! models, with a CPU reference backend that every other backend is checked against.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod engine;
pub mod fsutil;
pub mod generate;
pub mod hub;
pub mod loss;
pub mod memory_plan;
pub mod model;
pub mod ops;
pub mod plot;
pub mod selftest;
pub mod step;
pub mod tokenizer;
pub mod train;
