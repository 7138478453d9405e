//! Provider clients against local HTTP servers (wiremock) speaking each provider's
//! documented wire format: what we send is checked, what they stream is assembled.

mod anthropic;
mod chunks;
mod gemini;
mod guard;
mod openai;
mod support;
