"""Training-loop pieces shared by every method: schedules, loss checks, progress, validation.

Below the methods and above the ground floor: it imports no method and no platform module.
"""
