//! salvage
