//! Policy state machines, free of I/O and tested on a paused clock.
