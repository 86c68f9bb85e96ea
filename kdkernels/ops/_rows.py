"""What every kernel needs of its [N, C] inputs."""


def unit_stride(x):
    """x itself where its last (class) dimension has unit stride, else a contiguous copy; None
    stays None. Other strides (rows) the kernels take as they are."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def shard_statistics(op, student, teacher, target, temps, vocab_start, vocab_size, o):
    """A kernel's shard_statistics op called as the torch backend's is."""
    return op(unit_stride(student.detach()),
              unit_stride(None if teacher is None else teacher.detach()),
              None if target is None else target.long(), temps.double().contiguous(),
              vocab_start, vocab_size, o.pack())


def shard_pass(op, op_over, student, teacher, target, rows, vocab_start, vocab_size, o, grad,
               overwrite):
    """A kernel's shard_pass op (into a new tensor) called as the torch backend's is;
    ``overwrite`` (a gradient, unit class stride) runs op_over, which writes it over
    ``student``, and returns that."""
    teacher = unit_stride(None if teacher is None else teacher.detach())
    target = None if target is None else target.long()
    rows = rows.double().contiguous()
    if overwrite and grad and student.stride(-1) == 1:
        op_over(student, teacher, target, rows, vocab_start, vocab_size, o.pack())
        return student
    return op(unit_stride(student.detach()), teacher, target, rows, vocab_start, vocab_size,
              o.pack(), grad)
