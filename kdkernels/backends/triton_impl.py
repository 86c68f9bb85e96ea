NAME = "triton"
def availability(device=None):
    return False, "not built yet"
