"""Training performance: FLOPs per step (:mod:`.flops`), the hardware's peak FLOP/s (:mod:`.peak`) and the
achieved FLOP/s and MFU in between (:mod:`.meter`)."""
