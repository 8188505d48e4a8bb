"""Qt dock widgets. Each is thin over the headless session and jobs it drives.

Importing this package (which napari does before it imports any dock module) first keeps
Triton and Mesa's LLVM apart (:func:`._workers.avoid_llvm_clash`): it must run before anything
here imports torch, once per process.
"""

from ._workers import avoid_llvm_clash

avoid_llvm_clash()
