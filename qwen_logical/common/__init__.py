"""The ground floor: errors, host facts (memory, which process prints) and progress bars."""
